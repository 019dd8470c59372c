"""What the BCC sensors share: the build (knobs, BTF offsets, program text, BCC's errors)
and one base class (load, ring, maps, scope, mode). The sensors themselves:
``agent.sensors.bpf_exec`` (kill), ``agent.sensors.bpf_lsm`` (bpf-lsm) and
``agent.sensors.bpf_fmod_ret`` (fmod-ret)."""

from agent.sensors.bpf.build import BPF_DIR, OffsetsFn, SensorConfig
from agent.sensors.bpf.sensor import BpfSensor, Guards

__all__ = ["BPF_DIR", "BpfSensor", "Guards", "OffsetsFn", "SensorConfig"]
