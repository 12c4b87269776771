"""The contract both sides share, torch-free and free of FastAPI and database code.

- ``contract.methods``: the training methods and the dataset kinds each consumes;
- ``contract.hyperparameters``: ``LoraSettings`` and one ``*Hyperparameters`` model per method, with help text;
- ``contract.protocol``: ``TrainingSpec`` (runner -> child) and the child's JSON-lines progress protocol;
- ``contract.graders``: grader specs (OpenAI's kinds and alignd's) and their templates; ``contract.grading``
  scores a sample with one (``formula``, ``safe_regex`` and ``textmetrics`` are its parts);
- ``contract.evaluation``: the evaluate job's spec and result; ``contract.statistics`` its bootstrap means and
  paired win-rates (numpy; only the child and the tests import it).

The API (``service/``) validates submissions against these models; the runner (``workers/runner.py``) writes a
``TrainingSpec``; the training child (``workers/training/``) reads it back and answers in the protocol.
"""
