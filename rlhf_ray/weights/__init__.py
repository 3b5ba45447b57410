"""Policy weights from the learner to the generation engines: transports and loading into vLLM."""
