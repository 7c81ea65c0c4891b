"""Inference on existing servers (llama-server, vLLM, Ollama, LM Studio)."""
