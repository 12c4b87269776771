"""The training child: ``python -m workers.training /path/spec.json``.

This package is the only place that imports torch, transformers and peft, and it does so lazily: importing
``workers.training`` (or its torch-free modules ``errors``, ``context`` and ``registry``) stays cheap, so the
runner and the API can refer to method names and error codes without the ``train`` extra installed.

Modules: ``__main__`` (entry point: stdout protocol, signals, dispatch), ``registry`` (method -> trainer),
``data`` (tokenisation, masking, collators, length bucketing), ``lora`` (base loading, adapters, save),
``sft`` (the SFT loop), ``reward`` (reward model), ``dpo`` (DPO), ``preference`` (what reward and DPO
share), ``modelcard`` (README.md written next to every adapter).
"""
