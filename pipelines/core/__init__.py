"""The run-directory core every stage stands on: the stage contract and the runner (``stage``), the run
directory (``rundir``), the row schema (``rows``), the shared recipe parts and loading (``config``,
``recipe``), the stage registry (``registry``), the taxonomy, prompt files, parsing of LLM answers, text
normalisation and splits. It imports nothing else from ``pipelines``."""
