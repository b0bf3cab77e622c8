"""Counters of one offload, written as JSON at exit (``--stats`` / ``RRTO_STATS``)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    mode: str = ""
    server: str | None = None
    embedded_server: bool = False
    ops_intercepted: int = 0  # aten ops on the virtual cuda device
    messages_sent: int = 0
    round_trips: int = 0  # messages the robot waited on
    bytes_sent: int = 0
    bytes_received: int = 0
    uploads: int = 0
    downloads: int = 0
    syncs: int = 0  # torch.cuda.synchronize() calls
    meta_cache_hits: int = 0
    meta_cache_misses: int = 0
    # record / replay
    sequence_found: bool = False
    sequence_length: int = 0  # steps of the adopted per-inference program
    sequence_waits: int = 0  # of which the robot waits for the server (downloads, syncs, data-dependent ops)
    sequence_uploads: int = 0
    recorded_inferences: int = 0  # iterations run eagerly to find the sequences adopted
    replayed_inferences: int = 0
    replay_divergences: int = 0
    replay_messages: int = 0  # messages sent during replayed iterations
    answered_ahead: int = 0  # waits whose answer the server sent unasked, having run ahead
    runs_recalled: int = 0  # runs ahead taken back because another thread touched what they did
    replayers: int = 0  # replay mode: one per app thread that calls ops (and again after a reconnection)
    # faults: the server lost, the app run on the robot's CPU meanwhile, then offloading again
    faults: int = 0
    reconnects: int = 0
    local_ops: int = 0  # ops run on the robot's CPU while the server was lost
    lineage_cuts: int = 0  # long-lived tensors fetched so their local recipe stays short
    weights_adopted: int = 0  # re-uploads the server's weight cache answered by content digest
    # lop
    lop_inferences: int = 0  # replayed iterations whose input went up in bands
    lop_depth: int = 0  # the plan: robot bands run steps [0, depth)
    lop_bands: int = 0
    lop_robot_bands: int = 0
    lop_kept_bands: bool = False  # the band plan measured faster than whole uploads (lop), or is used untimed
    lop_trial_bands_ms: float = 0.0  # the trial's medians, upload to the app's last reply
    lop_trial_whole_ms: float = 0.0
    lop_server_measured: bool = False  # the plan used server step times measured on the server
    # synchronize() calls seen when planning last ended (its plan, or none, in effect from the
    # next inference; planning runs in the background until then); -1: planning, or never planned
    lop_planned_at_sync: int = -1
    lop_replans: int = 0  # plans changed since (bandwidth moved to another bin, or the model drifted)
    # what lop measured online: the link (from replayed inferences' own round trips), the robot's
    # walk through the app's calls per inference, and its band times over their profiled model
    lop_link_mbit: float = 0.0
    lop_link_rtt_ms: float = 0.0
    lop_walk_ms: float = 0.0
    lop_robot_scale: float = 1.0
    # lop: the planned inference's modelled schedule, [lane, start_s, end_s, label] per interval
    timeline: list = field(default_factory=list)
    robot_torch: str = ""
    server_torch: str = ""
    server_device: str = ""
    started: float = field(default_factory=time.perf_counter, repr=False)

    def snapshot(self) -> dict:
        d = asdict(self)
        d["wall_s"] = round(time.perf_counter() - d.pop("started"), 4)
        n = self.replayed_inferences
        d["messages_per_replayed_inference"] = round(self.replay_messages / n, 3) if n else None
        return d

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
