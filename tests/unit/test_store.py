"""WeightStore, the ModelCache's state machine, without Ray: loads once, leases, LRU eviction that
skips held models and forgets dead holders, the failed-load pause (in virtual time), reloads of
reported lost refs, default sizes, and leases that survive concurrent releases and evictions.

`put` returns a plain object and `load` builds small `ModelWeights`; both count their calls.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np
import pytest

from shared.config import CacheConfig, ModelConfig
from shared.errors import ModelLoadError, NotFoundError
from shared.weights.loader import ComponentWeights, ModelWeights
from shared.weights.store import WeightStore, default_size
from shared.weights.tensor_files import TensorBlob

MB = 1_000_000
_serials = count()


@dataclass(eq=False)
class FakeRef:
    """What `put` returns: a plain object naming the component it stands for."""

    model: str
    component: str
    serial: int = field(default_factory=lambda: next(_serials))

    def hex(self) -> str:
        return f"{self.serial:032x}"


def weights(
    model_id: str, nbytes: int, unet: dict[str, Any] | None = None, load: int = 1
) -> ModelWeights:
    """A three-component model of `nbytes` (all in the UNet), trained at 128 px by default; its
    files' digests say which `load` of the model read them."""
    blob = TensorBlob(data=np.zeros(nbytes, np.uint8), dtype="U8", shape=(nbytes,))
    unet_config = {"_name_or_path": model_id, "sample_size": 16} if unet is None else unet
    vae_config = {"_name_or_path": model_id, "block_out_channels": [8, 16, 16, 16]}
    return ModelWeights(
        source=model_id,
        components={
            "unet": ComponentWeights(
                "unet",
                "diffusers",
                "UNet2DConditionModel",
                unet_config,
                tensors={"w": blob},
                files_sha256={"unet/config.json": f"{load:064x}", "unet/w.safetensors": "ab" * 32},
            ),
            "vae": ComponentWeights("vae", "diffusers", "AutoencoderKL", vae_config),
            "scheduler": ComponentWeights(
                "scheduler", "diffusers", "EulerDiscreteScheduler", {"_name_or_path": model_id}
            ),
        },
    )


class Backend:
    """The store's injected callables, counting what they were asked to do."""

    def __init__(self, nbytes: int = 100 * MB) -> None:
        self.nbytes = nbytes
        self.loads: Counter[str] = Counter()
        self.puts: Counter[str] = Counter()
        self.live: set[str] = set()
        self.live_calls = 0
        self.failures: dict[str, list[Exception]] = {}  # raised by the next loads of a model
        self.gates: dict[str, threading.Event] = {}  # a load of the model waits for its event
        self.loading = threading.Event()
        self.now = 0.0
        self._lock = threading.Lock()

    def load(self, model: ModelConfig) -> ModelWeights:
        with self._lock:
            self.loads[model.id] += 1
            pending = self.failures.get(model.id)
            failure = pending.pop(0) if pending else None
            load = self.loads[model.id]
        self.loading.set()
        if model.id in self.gates:
            assert self.gates[model.id].wait(10), "the test never opened the gate"
        if failure is not None:
            raise failure
        return weights(model.id, self.nbytes, load=load)

    def put(self, component: ComponentWeights) -> FakeRef:
        model_id = component.config["_name_or_path"]
        with self._lock:
            self.puts[model_id] += 1
        return FakeRef(model_id, component.name)

    def live_holders(self) -> set[str]:
        with self._lock:
            self.live_calls += 1
            return set(self.live)

    def clock(self) -> float:
        return self.now


def make_store(
    backend: Backend,
    ids: str = "abc",
    capacity_bytes: int = 10**12,
    retry_failed_after_s: float = 30.0,
    load: Callable[[ModelConfig], ModelWeights] | None = None,
    **store: Any,
) -> WeightStore[FakeRef]:
    models = [ModelConfig(id=i, source="tiny", preload=False) for i in ids]
    cache = CacheConfig(capacity_bytes=capacity_bytes, retry_failed_after_s=retry_failed_after_s)
    return WeightStore(
        models,
        cache,
        put=backend.put,
        live_holders=backend.live_holders,
        load=load or backend.load,
        clock=backend.clock,
        **store,
    )


def states(store: WeightStore[FakeRef]) -> dict[str, tuple[str, int]]:
    return {m: (s["state"], s["holders"]) for m, s in store.describe().items()}


def run_threads(count_: int, target: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count_) as pool:
        futures = [pool.submit(target, i) for i in range(count_)]
        return [future.result(timeout=60) for future in futures]


class Recorder:
    """A StoreObserver that keeps what it was told."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.loads: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.bytes: list[int] = []

    def hit(self, model_id: str) -> None:
        self.hits[model_id] += 1

    def loaded(self, model_id: str, seconds: float) -> None:
        self.loads[model_id] += 1

    def failed(self, model_id: str) -> None:
        self.failures[model_id] += 1

    def stored(self, nbytes: int) -> None:
        self.bytes.append(nbytes)


# ------------------------------------------------------------------------------------- loading


def test_concurrent_first_gets_load_once_while_other_models_are_served() -> None:
    backend = Backend()
    backend.gates["a"] = threading.Event()
    store = make_store(backend)
    entered = threading.Semaphore(0)

    def first_get(_: int) -> dict[str, FakeRef]:
        entered.release()
        return store.get("a")

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(first_get, i) for i in range(8)]
        for _ in range(8):
            assert entered.acquire(timeout=10)
        assert backend.loading.wait(10)
        # `a` is being read: another model loads and is served meanwhile.
        assert set(store.get("b")) == {"unet", "vae", "scheduler"}
        assert states(store)["a"] == ("loading", 0)
        backend.gates["a"].set()
        results = [future.result(timeout=10) for future in futures]

    assert all(refs == results[0] for refs in results)  # the same objects for every caller
    assert backend.loads == {"a": 1, "b": 1}
    assert backend.puts == {"a": 3, "b": 3}
    assert store.describe()["a"] == {
        "state": "cached",
        "bytes": 100 * MB,
        "loads": 1,
        "holders": 0,
        "load_seconds": 0.0,
    }


def test_preload_loads_marked_models_and_records_failures_without_raising() -> None:
    backend = Backend()
    backend.failures["b"] = [ModelLoadError("bad b", code="checksum_mismatch")]
    models = [ModelConfig(id=i, source="tiny", preload=i != "c") for i in "abc"]
    store = WeightStore(
        models, CacheConfig(), put=backend.put, live_holders=backend.live_holders, load=backend.load
    )
    store.preload()
    assert {m: s["state"] for m, s in store.describe().items()} == {
        "a": "cached",
        "b": "failed",
        "c": "not_loaded",
    }
    assert backend.loads == {"a": 1, "b": 1}


def test_unknown_models_are_not_found() -> None:
    store = make_store(Backend())
    calls = [
        lambda: store.get("zzz"),
        lambda: store.defaults("zzz"),
        lambda: store.release("zzz", "h"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as info:
            call()
        assert info.value.code == "model_not_found" and "'zzz'" in info.value.message


def test_the_store_imports_neither_ray_nor_torch() -> None:
    script = (
        "import sys, shared.weights.store\n"
        "print(sorted({'ray', 'torch'} & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ eviction


def test_lru_eviction_past_capacity_skips_held_models() -> None:
    backend = Backend()
    backend.live = {"replica-1"}
    store = make_store(backend, capacity_bytes=250 * MB)  # room for two models
    store.get("a", holder="replica-1")  # least recently used, but held
    store.get("b")
    store.get("c")
    assert states(store) == {"a": ("cached", 1), "b": ("not_loaded", 0), "c": ("cached", 0)}

    store.get("a")  # a hit: `c` is now the least recently used
    store.get("b")
    assert states(store) == {"a": ("cached", 1), "b": ("cached", 0), "c": ("not_loaded", 0)}
    assert backend.loads == {"a": 1, "b": 2, "c": 1}


def test_every_model_held_leaves_the_store_over_capacity() -> None:
    backend = Backend()
    backend.live = {"r1", "r2"}
    store = make_store(backend, capacity_bytes=150 * MB)
    store.get("a", holder="r1")
    store.get("b", holder="r2")
    assert states(store) == {"a": ("cached", 1), "b": ("cached", 1), "c": ("not_loaded", 0)}
    # A model loaded without a holder is not evicted by its own load either.
    store.get("c")
    assert states(store) == {"a": ("cached", 1), "b": ("cached", 1), "c": ("cached", 0)}


def test_release_evicts_at_once_when_over_capacity() -> None:
    backend = Backend()
    backend.live = {"r1", "r2"}
    recorder = Recorder()
    store = make_store(backend, capacity_bytes=150 * MB, observer=recorder)
    store.get("a", holder="r1")
    store.get("b", holder="r2")
    store.release("b", "r2")
    assert states(store) == {"a": ("cached", 1), "b": ("not_loaded", 0), "c": ("not_loaded", 0)}
    assert recorder.bytes[-1] == 100 * MB

    calls = backend.live_calls
    store.release("a", "r1")  # under capacity now: nothing to evict, nobody asked who is alive
    assert states(store)["a"] == ("cached", 0)
    assert backend.live_calls == calls


def test_dead_holders_are_forgotten_and_their_models_evicted() -> None:
    backend = Backend()
    backend.live = {"crashed", "alive"}
    store = make_store(backend, capacity_bytes=150 * MB)
    store.get("a", holder="crashed")
    store.get("b", holder="alive")
    backend.live = {"alive"}  # `crashed` died without releasing `a`
    store.get("c", holder="alive")
    assert states(store) == {"a": ("not_loaded", 0), "b": ("cached", 1), "c": ("cached", 1)}


# ------------------------------------------------------------------------------------ failures


def test_a_failed_load_is_paused_then_retried() -> None:
    backend = Backend()
    backend.failures["a"] = [ModelLoadError("unet is truncated", code="truncated")]
    recorder = Recorder()
    store = make_store(backend, retry_failed_after_s=30, observer=recorder)

    for _ in range(3):
        with pytest.raises(ModelLoadError) as info:
            store.get("a")
        assert info.value.code == "truncated"
        backend.now += 9  # 27 s after the failure: still inside the pause
    assert backend.loads["a"] == 1  # the source was read once, not per request
    status = store.describe()["a"]
    assert status["state"] == "failed" and status["error"]["code"] == "truncated"
    assert "load_seconds" not in status

    backend.now += 3  # 30 s: the next request retries, and the source is fixed
    assert set(store.get("a", holder="r")) == {"unet", "vae", "scheduler"}
    assert store.describe()["a"]["state"] == "cached" and "error" not in store.describe()["a"]
    assert backend.loads["a"] == 2
    assert recorder.failures == {"a": 1} and recorder.loads == {"a": 1}


def test_each_raise_is_a_fresh_copy_of_the_recorded_error() -> None:
    backend = Backend()
    backend.failures["a"] = [ModelLoadError("bad checksum", code="checksum_mismatch")]
    store = make_store(backend)
    raised = []
    for _ in range(3):
        with pytest.raises(ModelLoadError) as info:
            store.defaults("a")
        raised.append(info.value)
    assert len({id(e) for e in raised}) == 3
    assert all(e.to_dict() == raised[0].to_dict() for e in raised)
    # Frames of one request never pile onto the next one's traceback.
    assert all(len(list(_frames(e))) == len(list(_frames(raised[0]))) for e in raised)


def _frames(error: BaseException) -> Iterator[Any]:
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def test_unexpected_loader_errors_become_model_load_errors() -> None:
    backend = Backend()
    backend.failures["a"] = [RuntimeError("disk on fire")]
    store = make_store(backend)
    with pytest.raises(ModelLoadError) as info:
        store.get("a")
    assert info.value.code == "model_load_failed"
    assert info.value.message == "model 'a' could not be loaded: RuntimeError: disk on fire"
    assert store.describe()["a"]["error"]["code"] == "model_load_failed"
    assert states(store)["b"] == ("not_loaded", 0)  # the store and other models carry on
    store.get("b")


def test_a_failing_put_fails_the_model() -> None:
    backend = Backend()

    def put(component: ComponentWeights) -> FakeRef:
        raise MemoryError("object store full")

    store = WeightStore(
        [ModelConfig(id="a", source="tiny")],
        CacheConfig(),
        put=put,
        live_holders=backend.live_holders,
        load=backend.load,
    )
    with pytest.raises(ModelLoadError, match="MemoryError: object store full"):
        store.get("a")
    assert store.describe()["a"]["state"] == "failed"


# ---------------------------------------------------------------------------------- lost refs


def test_reported_lost_refs_reload_once_for_every_reporter() -> None:
    backend = Backend()
    store = make_store(backend)
    lost = store.get("a", holder="r0")
    stale = [ref.hex() for ref in lost.values()]

    fresh = run_threads(4, lambda i: store.get("a", stale=stale, holder=f"r{i}"))

    assert backend.loads["a"] == 2 and backend.puts["a"] == 6
    assert all(refs == fresh[0] for refs in fresh)
    assert not {ref.hex() for ref in fresh[0].values()} & set(stale)
    assert states(store)["a"] == ("cached", 4)  # r0 reported too: every lease is kept
    # Refs nobody reported as lost are served as they are.
    assert store.get("a", stale=stale) == fresh[0]
    assert store.get("a", stale=["0" * 32, "not-a-ref"]) == fresh[0]
    assert backend.loads["a"] == 2


# ----------------------------------------------------------------------------------- defaults


def test_defaults_load_the_model_and_read_the_checkpoint_size() -> None:
    backend = Backend()
    recorder = Recorder()
    store = make_store(backend, observer=recorder)
    assert store.defaults("a") == {"width": 128, "height": 128}  # 16 latents * 2 ** 3
    assert states(store)["a"] == ("cached", 0)  # loaded, but nobody holds it
    assert store.defaults("a") == {"width": 128, "height": 128}
    assert backend.loads["a"] == 1 and recorder.hits["a"] == 1


def test_defaults_fall_back_to_none_when_the_configs_do_not_say() -> None:
    store = make_store(Backend(), load=lambda m: weights(m.id, 10, unet={"_name_or_path": m.id}))
    assert store.defaults("a") == {}
    assert store.describe()["a"]["state"] == "cached"


def test_digests_come_from_the_store_and_follow_reloads() -> None:
    backend = Backend()
    store = make_store(backend, retry_failed_after_s=30)
    refs = store.get("a", holder="r0")
    first = store.digests("a")
    assert first == {
        "unet": {"unet/config.json": f"{1:064x}", "unet/w.safetensors": "ab" * 32},
        "vae": {},
        "scheduler": {},
    }
    first["unet"].clear()  # a copy: callers cannot change the store's record
    assert store.digests("a")["unet"]["unet/config.json"] == f"{1:064x}"
    assert (backend.loads["a"], backend.puts["a"]) == (1, 3)  # answered without touching refs

    store.get("a", stale=[ref.hex() for ref in refs.values()])  # reloaded: new files' digests
    assert store.digests("a")["unet"]["unet/config.json"] == f"{2:064x}"
    assert store.digests("b")["unet"]["unet/config.json"] == f"{1:064x}"  # loads, like defaults
    assert backend.loads == Counter({"a": 2, "b": 1})

    backend.failures["c"] = [ModelLoadError("bad checksum", code="checksum_mismatch")]
    with pytest.raises(ModelLoadError) as failed:
        store.digests("c")
    assert failed.value.code == "checksum_mismatch"
    with pytest.raises(NotFoundError):
        store.digests("nope")


def test_an_evicted_model_reports_the_digests_of_its_reload() -> None:
    backend = Backend(nbytes=60 * MB)
    store = make_store(backend, capacity_bytes=100 * MB)
    store.get("a")
    store.get("b")  # over capacity: `a` (unheld, least recently used) is evicted
    assert states(store)["a"] == ("not_loaded", 0)
    assert store.digests("a")["unet"]["unet/config.json"] == f"{2:064x}"


@pytest.mark.parametrize(
    ("unet", "expected"),
    [
        ({"sample_size": 128}, {"width": 1024, "height": 1024}),  # SDXL base
        ({"sample_size": [96, 128]}, {"width": 1024, "height": 768}),  # (height, width)
        ({"sample_size": "128"}, {}),
        ({"sample_size": True}, {}),
        ({}, {}),
    ],
)
def test_default_size(unet: dict[str, Any], expected: dict[str, int]) -> None:
    assert default_size(weights("m", 1, unet=unet)) == expected
    without_vae = weights("m", 1, unet=unet)
    del without_vae.components["vae"]
    assert default_size(without_vae) == {}


# --------------------------------------------------------------------------------- concurrency


@contextmanager
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms, so races show up in a short run."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_leases_survive_concurrent_releases_and_evictions() -> None:
    """Replicas take, check and release leases while others release and evict; room for one
    unheld model, so nearly every release evicts. A lease, once `get` returns, keeps the model
    cached with the same refs until its holder releases it, and a held model is never read
    again (which would store it twice)."""
    backend = Backend(nbytes=100)
    workers, rounds = 6, 400
    backend.live = {f"replica-{i}" for i in range(workers)}
    held: dict[str, set[str]] = {m: set() for m in "abc"}  # the leases the replicas think they have
    held_lock = threading.Lock()
    violations: list[str] = []

    def load(model: ModelConfig) -> ModelWeights:
        with held_lock:
            if held[model.id]:
                violations.append(f"{model.id} read again while held by {sorted(held[model.id])}")
        return backend.load(model)

    store = make_store(backend, capacity_bytes=150, load=load)
    done = threading.Event()

    def replica(i: int) -> None:
        holder, rng = f"replica-{i}", random.Random(i)
        for _ in range(rounds):
            model = rng.choice("abc")
            refs = store.get(model, holder=holder)
            with held_lock:
                held[model].add(holder)
            if store.describe()[model]["state"] != "cached":
                violations.append(f"{model} left the cache while {holder} held it")
            if store.get(model) != refs:
                violations.append(f"{model} changed refs while {holder} held it")
            with held_lock:
                held[model].discard(holder)
            store.release(model, holder)

    def evictor(i: int) -> None:
        rng = random.Random(100 + i)
        while not done.is_set():
            store.release(rng.choice("abc"), "nobody")  # every call runs an eviction pass

    with frequent_thread_switches(), ThreadPoolExecutor(max_workers=workers + 2) as pool:
        evictors = [pool.submit(evictor, i) for i in range(2)]
        try:
            for future in [pool.submit(replica, i) for i in range(workers)]:
                future.result(timeout=120)
        finally:
            done.set()
        for future in evictors:
            future.result(timeout=10)

    assert violations == [], f"{len(violations)} violations, first: {violations[:5]}"
    assert all(n > 1 for n in backend.loads.values()), backend.loads  # eviction really happened
    assert backend.puts == {m: 3 * n for m, n in backend.loads.items()}
    final = store.describe()
    assert all(s["holders"] == 0 for s in final.values()), final  # no lease leaked either
    assert sum(s["bytes"] for s in final.values() if s["state"] == "cached") <= 150
