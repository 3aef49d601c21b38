"""quill's pipeline: one package per DVC stage (python -m pipelines.<stage>), shared code in pipelines/common."""
