"""The router's Prometheus metrics, rendered by hand in the text exposition format (version 0.0.4).

Counters live here; gauges (in-flight, health) are read from the registry's
instances at render time, so an instance that leaves leaves the page too.
The metric names are part of the router's contract (dashboards scrape them).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

from pdserve.router.registry import Instance

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
NO_INSTANCE = "none"  # the instance label of an error no instance caused (nothing healthy, a bad body)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class RouterMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (instance, role) -> requests sent to it
        self.errors: Counter[tuple[str, str]] = Counter()  # (instance, code) -> error answers given
        self.bucket_counts = [0] * len(REQUEST_BUCKETS)  # per bucket (not cumulative)
        self.seconds_sum = 0.0
        self.seconds_count = 0
        self.migrations: Counter[str] = Counter()  # reason -> streams moved to another instance mid-answer
        self.num_retries = 0  # requests retried on a fresh route before their first byte

    def count_migration(self, reason: str) -> None:
        self.migrations[reason] += 1

    def count_retry(self) -> None:
        self.num_retries += 1

    def count_request(self, inst: Instance) -> None:
        self.requests[(inst.url, inst.role)] += 1

    def count_error(self, instance: str, code: str) -> None:
        self.errors[(instance, code)] += 1

    def observe_seconds(self, seconds: float) -> None:
        i = bisect.bisect_left(REQUEST_BUCKETS, seconds)
        if i < len(self.bucket_counts):
            self.bucket_counts[i] += 1
        self.seconds_sum += seconds
        self.seconds_count += 1

    def render(self, instances: Iterable[Instance]) -> str:
        instances = list(instances)
        lines = [
            "# HELP pdserve_router_requests_total Requests the router sent to an instance (a PD request counts "
            "once for P and once for D)",
            "# TYPE pdserve_router_requests_total counter",
        ]
        lines += [
            f"pdserve_router_requests_total{_labels(instance=u, role=r)} {n}"
            for (u, r), n in sorted(self.requests.items())
        ]
        lines += [
            "# HELP pdserve_router_errors_total Error answers the router gave, by the instance that caused "
            "them and the error code",
            "# TYPE pdserve_router_errors_total counter",
        ]
        lines += [
            f"pdserve_router_errors_total{_labels(instance=u, code=c)} {n}" for (u, c), n in sorted(self.errors.items())
        ]
        lines += [
            "# HELP pdserve_router_migrations_total Streams moved to another instance mid-answer, resuming after "
            "the tokens the client had, by why the first instance was left (stalled, failed)",
            "# TYPE pdserve_router_migrations_total counter",
        ]
        lines += [
            f"pdserve_router_migrations_total{_labels(reason=r)} {self.migrations[r]}" for r in ("failed", "stalled")
        ]
        lines += [
            "# HELP pdserve_router_retries_total Requests retried on a fresh route after an instance failed before "
            "the client had a byte",
            "# TYPE pdserve_router_retries_total counter",
            f"pdserve_router_retries_total {self.num_retries}",
        ]
        lines += [
            "# HELP pdserve_router_in_flight Requests the router has open on an instance",
            "# TYPE pdserve_router_in_flight gauge",
        ]
        lines += [f"pdserve_router_in_flight{_labels(instance=i.url)} {i.num_in_flight}" for i in instances]
        lines += [
            "# HELP pdserve_router_instance_healthy 1 while the instance passes its health checks",
            "# TYPE pdserve_router_instance_healthy gauge",
        ]
        lines += [
            f"pdserve_router_instance_healthy{_labels(instance=i.url, role=i.role)} {int(i.is_healthy)}"
            for i in instances
        ]
        lines += [
            "# HELP pdserve_router_request_seconds Time from a request's arrival to its last byte",
            "# TYPE pdserve_router_request_seconds histogram",
        ]
        cumulative = 0
        for bound, n in zip(REQUEST_BUCKETS, self.bucket_counts):
            cumulative += n
            lines.append(f'pdserve_router_request_seconds_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'pdserve_router_request_seconds_bucket{{le="+Inf"}} {self.seconds_count}')
        lines.append(f"pdserve_router_request_seconds_sum {_number(self.seconds_sum)}")
        lines.append(f"pdserve_router_request_seconds_count {self.seconds_count}")
        return "\n".join(lines) + "\n"
