"""The composition root: the one place that wires the service (``service/``) and the workers (``workers/``).

``service`` never imports ``workers`` and ``workers`` imports only the service's domain and storage; the
server's command line (``alignd-server``) and embedded mode (an API whose jobs run in its own process) need
both, so they live here, outside either package.
"""
