"""The lifecycle jupyter_client sees, written once for every target.

:mod:`.base` holds :class:`ClusterProvisioner` (the settings and the lifecycle),
:mod:`.engine` the :class:`Engine` base every target's engine fills in, with each hook's
error contract. The rest serve the lifecycle only: :mod:`.newports` (a restart keeps its
ports), :mod:`.fallback` (the local fallback's policy), :mod:`.failed_start` (the errors a
server shows), :mod:`.leftovers` (removals retried until done) and :mod:`.owner` (which
server owns a kernel).
"""
