"""The node's reconcilers, one module per area, each a :class:`agent.reconcile.Reconciler` run by a
:class:`agent.reconcile.Controller` that ``agent/node.py`` composes with its drivers. Reconcilers read and write the
store; the drivers they call (``agent/compute``, ``agent/net``, ``agent/host``) know nothing of it."""
