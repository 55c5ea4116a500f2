"""Serving a run: the OpenAI API edge (:mod:`.openai`), dynamic batching (:mod:`.batcher`), the server
``switchcit serve`` (:mod:`.app`) and the vLLM gateway ``switchcit route`` / ``export-vllm``
(:mod:`.gateway`)."""
