"""The whole loop as library code: the services it runs, the scenario, its report.

* ``config``: the plan (``LoopConfig``) and the outcome (``Outcome``) with its checks; pure.
* ``stack``: starts and stops broker, fleet API, cloud API + worker, drift monitor, agents.
* ``scenario``: train, compile, canary, OIP traffic, drift, alert, oracle relabel, retrain,
  redeploy, through the services' public APIs.
* ``report``: ``summary.json``, the self-contained HTML report with plots, the rich table.

``edgeloop demo`` (edgeloop/demo.py) is the command over these; tests/test_demo.py runs it.
"""
