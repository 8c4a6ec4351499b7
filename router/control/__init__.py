"""The cluster view put to work: every decision about starting, stopping and waiting.

``client`` (``ControlClient``: commands to workers, on-demand starts, waiting for them),
``host_rank`` (which host and GPUs a start should go to, what it would evict),
``scheduler`` (whose turn it is to be swapped in; residency, drain and starvation rules),
``waitboard`` (the cluster-wide line of waiting models in Redis), ``pending`` (that line
rebuilt for display), ``explain`` (``WaitReason``s: why a request waits and for how long),
``in_use`` (``llm:used``: which models are busy, for the workers' idle reaper), ``admin`` (the management API's
logic: start, stop, logs, info), ``device_report`` (the cluster's GPU and CPU summaries for
``/api/devices/info``).
"""
