"""Where model groups live: on a device (serving), in the CPU cache (parked), or nowhere (not loaded).

A loaded group is one `LMPool` (one copy of each base model) plus the NLAs of all its models built on that pool,
so switching between models of a group costs nothing. A group leaving a device is moved to the CPU cache (least
recently used groups beyond its capacity are dropped); coming back, it is moved from the cache instead of being
loaded again. A group is in exactly one place at a time: a copy on a device is never also listed as cached
(the cache's reference would keep the device's weights alive after the group left it).

Everything here blocks (weights are read and moved): the device's `scheduling.workers.LocalWorker` calls it from
threads, and the scheduler makes sure a device is never loaded while work runs on it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...nla.checkpoint import NLA
from ...nla.identity import content_hash
from ...nla.lens import TunedLens, load_tuned_lens
from ...nla.lm import LMPool
from ...nla.loading import INIT_PREFIX, open_nla
from ...nla.precision import AUTO, resolve_dtype

if TYPE_CHECKING:
    from ..settings import Settings
    from .registry import GroupEntry, Registry

log = logging.getLogger("talkative.serve.catalog.residency")

CPU = "cpu"


@dataclass
class GroupRuntime:
    """One loaded copy of a group: its pool (shared bases), its NLAs, and where the weights are."""

    group_id: str
    device: str
    pool: LMPool
    nlas: dict[str, NLA] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # model id -> why it could not be loaded
    tuned: dict[str, TunedLens] = field(default_factory=dict)
    identities: dict[str, str] = field(
        default_factory=dict
    )  # model id -> its NLA's content hash (result cache)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    def move(self, device: str, *, force: bool = False) -> None:
        """Move every tensor of the group to `device` (base weights once, then each NLA's own parameters)."""
        if device == self.device and not force:
            return
        for lm in self.pool.models():
            lm.model.to(device)  # type: ignore[arg-type]
        for nla in self.nlas.values():
            nla.verbalizer.to(device)
            nla.reconstructor.to(device)
        for lens in self.tuned.values():
            lens.to(device)
        self.pool.device = device
        self.device = device


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class Residency:
    """Loads groups onto devices, parks them in the CPU cache, and reports where everything is."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.capacity = registry.max_cpu_groups(settings)
        self._cache: OrderedDict[str, GroupRuntime] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------------------------
    def _dtype(self, group_id: str, device: str) -> str:
        """use_bf16: true, false, or "auto" (bfloat16 where the device computes it natively, `resolve_dtype`)."""
        bf16 = self.registry.model_setting(self.settings, "use_bf16", group_id=group_id)
        if bf16 == AUTO:
            return resolve_dtype(AUTO, device)
        return "bfloat16" if bf16 else "float32"

    def load_fresh(self, group: GroupEntry, device: str) -> GroupRuntime:
        """Build a group's NLAs on one new pool. A model that fails is recorded; the group fails if all do."""
        t0 = time.perf_counter()
        pool = LMPool(dtype=self._dtype(group.group_id, device), device=device)
        rt = GroupRuntime(group_id=group.group_id, device=device, pool=pool)
        digests: dict[int, str] = {}  # base model digests, shared by the group's NLAs
        for m in group.models:
            try:
                kwargs: dict[str, Any] = {}
                if m.different_activations_orig_path and not m.checkpoint.startswith(INIT_PREFIX):
                    kwargs["subject_override"] = m.different_activations_orig_path
                nla = open_nla(m.checkpoint, pool=pool, **kwargs)
                if m.layer is not None and nla.layer != m.layer:
                    raise ValueError(
                        f"{m.checkpoint} explains layer {nla.layer}, but the model entry says layer {m.layer}"
                    )
                rt.nlas[m.id] = nla
                lens = self._tuned_lens(m.id, group.group_id, nla)
                if lens is not None:
                    rt.tuned[m.id] = lens
                rt.identities[m.id] = content_hash(nla, lens, digests)
            except Exception as exc:  # a bad checkpoint must not take its group mates down
                log.error("model %s of group %s failed to load: %s", m.id, group.group_id, exc)
                rt.errors[m.id] = f"model {m.id} could not be loaded: {exc}"
        if not rt.nlas:
            raise RuntimeError(
                f"group {group.group_id} could not be loaded: " + "; ".join(rt.errors.values())
            )
        rt.move(device, force=True)  # parameters created on the CPU during construction follow the base
        log.info(
            "loaded group %s on %s in %.1fs (%d models)",
            group.group_id,
            device,
            time.perf_counter() - t0,
            len(rt.nlas),
        )
        return rt

    def _tuned_lens(self, model_id: str, group_id: str, nla: NLA) -> TunedLens | None:
        setting = self.registry.model_setting(self.settings, "comparison_tl_checkpoint", model_id=model_id)
        candidates: list[Path] = []
        if isinstance(setting, str):
            candidates.append(Path(setting).expanduser())
        if self.settings.tuned_lens_dir:
            root = Path(self.settings.tuned_lens_dir).expanduser()
            candidates += [root / group_id, root]
        for path in candidates:
            if (path / "params.pt").is_file():
                try:
                    return load_tuned_lens(path, nla.subject)
                except Exception as exc:
                    log.error("tuned lens %s does not fit model %s: %s", path, model_id, exc)
                    return None
        return None

    def acquire(self, group_id: str, device: str) -> GroupRuntime:
        """A runtime of the group on `device`: from the CPU cache when parked there, else loaded fresh."""
        with self._lock:
            rt = self._cache.pop(group_id, None)
        if rt is None:
            return self.load_fresh(self.registry.group(group_id), device)
        t0 = time.perf_counter()
        rt.move(device)
        log.info(
            "moved group %s from the CPU cache to %s in %.1fs", group_id, device, time.perf_counter() - t0
        )
        return rt

    def release(self, rt: GroupRuntime) -> None:
        """Park a group that leaves its device in the CPU cache; drop the least recently used beyond capacity."""
        source = rt.device
        if self.capacity <= 0:
            rt.nlas.clear()
            _free_device_memory(source)
            return
        rt.move(CPU)
        with self._lock:
            self._cache[rt.group_id] = rt
            self._cache.move_to_end(rt.group_id)
            dropped = []
            while len(self._cache) > self.capacity:
                dropped.append(self._cache.popitem(last=False)[0])
        for gid in dropped:
            log.info("dropped group %s from the CPU cache (capacity %d)", gid, self.capacity)
        _free_device_memory(source)

    def preload(self, group_id: str) -> bool:
        """Load a group straight into the CPU cache (settings.preload_groups); False when there is no room."""
        with self._lock:
            if group_id in self._cache or len(self._cache) >= self.capacity:
                return False
        rt = self.load_fresh(self.registry.group(group_id), CPU)
        with self._lock:
            self._cache[group_id] = rt
        return True

    def drop(self, runtimes: list[GroupRuntime]) -> list[str]:
        """Drop groups for good (a reset), freeing their memory, without parking them; their ids."""
        devices = {rt.device for rt in runtimes} | {CPU}
        for rt in runtimes:
            rt.nlas.clear()
            rt.tuned.clear()
            # the pool held the last references to the weights
            rt.pool = LMPool(dtype=rt.pool.dtype, device=CPU)
        for device in devices:
            _free_device_memory(device)
        return [rt.group_id for rt in runtimes]

    def evict(self, group_id: str) -> bool:
        """Drop one parked group for good (a worker replica that no longer serves it); False when not parked."""
        with self._lock:
            rt = self._cache.pop(group_id, None)
        if rt is None:
            return False
        self.drop([rt])
        return True

    def clear_cache(self) -> list[str]:
        """Drop every parked group (a reset); their ids."""
        with self._lock:
            parked = list(self._cache.values())
            self._cache.clear()
        return self.drop(parked)

    # -- state ----------------------------------------------------------------------------------------------------
    def cached_groups(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def cached_models(self) -> list[str]:
        with self._lock:
            return [mid for rt in self._cache.values() for mid in rt.nlas]
