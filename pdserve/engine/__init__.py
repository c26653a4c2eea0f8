"""Engine core loop, the offline LLM API, and text handling around token ids."""
