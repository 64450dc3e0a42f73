"""One teacher forward for several students trained side by side (the demo's students, kd_ablation's variants).

Students distilled from one teacher with one seed draw the same batches, noise and timesteps, so each of them
would run the same teacher forward on the same inputs: on the CPU that is a third of every step's work. A
SharedTeacher runs the teacher once, in a process of its own; each training process talks to it through a
TeacherClient (passed to `train(..., shared_teacher=...)`), which has kd.TeacherForward's interface.

Results are keyed by a hash of the inputs, never by step number: a student whose inputs differ (another seed,
another batch size) simply gets its own forward, so sharing cannot change what any student learns. A result is
dropped once every client has fetched it (or when more than `capacity` wait: a student that far behind gets a
fresh forward). Every value crosses processes through shared memory only while in flight, one block per reply.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from distill_sd.errors import UserError
from distill_sd.kd import TeacherOutputs


@dataclass(frozen=True)
class TeacherClient:
    """A training process's handle on the shared teacher: its index and the queues (given to the process at
    start, as multiprocessing queues must be)."""

    index: int
    requests: Any
    replies: Any
    names: tuple[str, ...] = ()

    def tap(self, feature_names: Sequence[str]) -> TeacherClient:
        """This client asking for these block outputs (in this order) besides the prediction."""
        return replace(self, names=tuple(feature_names))

    def submit(self, noisy: torch.Tensor, timesteps: torch.Tensor,
               unet_kwargs: dict[str, Any]) -> Callable[[], TeacherOutputs]:
        inputs = _shared_copy((noisy, timesteps, unet_kwargs))
        self.requests.put((self.index, _key(inputs), self.names, inputs))
        return lambda: self._receive(noisy.device)

    def _receive(self, device: torch.device) -> TeacherOutputs:
        kind, payload = self.replies[self.index].get()
        if kind == "error":
            raise UserError(payload)
        flat, shapes = payload
        parts = [p.view(s).to(device) for p, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)]
        return parts[0], parts[1:]


class SharedTeacher:
    """The teacher at `teacher` (a pipeline folder) served to `clients` training processes from one process.

    Use as a context manager; `client(i)` goes to training process i. Call `check()` while the students run:
    if the teacher process died, every client is told, so no student waits for it forever.
    """

    def __init__(self, teacher: str, clients: int, *, dtype: str | None = None, threads: int = 1,
                 capacity: int = 128, context: Any = None) -> None:
        import multiprocessing as mp

        ctx = context or mp.get_context("spawn")
        self.requests = ctx.Queue()
        self.replies = [ctx.Queue() for _ in range(clients)]
        self.process = ctx.Process(target=_serve, daemon=True, name="distill-sd-teacher",
                                   args=(teacher, dtype, threads, clients, capacity, self.requests, self.replies))
        self._told = False

    def __enter__(self) -> SharedTeacher:
        self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.requests.put(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()

    def client(self, index: int) -> TeacherClient:
        return TeacherClient(index, self.requests, self.replies)

    def check(self) -> None:
        if self.process.exitcode not in (None, 0) and not self._told:
            self._told = True
            for q in self.replies:
                q.put(("error", f"the shared teacher's process died (exit code {self.process.exitcode}); "
                                "rerun, or check free memory"))


def _serve(teacher: str, dtype: str | None, threads: int, clients: int, capacity: int, requests: Any,
           replies: list[Any]) -> None:
    """The teacher process: answer requests in arrival order, each input computed once."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes this process
    try:
        torch.set_num_threads(threads)
        from distill_sd.generate import DTYPES
        from distill_sd.kd import TeacherForward
        from distill_sd.models import load_teacher

        unet = load_teacher(teacher).unet.requires_grad_(False).eval()
        if dtype is not None:
            unet.to(DTYPES[dtype])
        forward = TeacherForward(unet, [])
        done: OrderedDict[str, _Result] = OrderedDict()
        while (request := _next_request(requests)) is not None:
            client, key, names, inputs = request
            result = done.get(key)
            if result is None or not set(names) <= result.features.keys():
                if not set(names) <= set(forward.names):  # tap the union of what clients ask for
                    forward.remove()
                    forward = TeacherForward(unet, sorted(set(forward.names) | set(names)))
                pred, feats = forward(*inputs)
                result = done[key] = _Result(pred, dict(zip(forward.names, feats, strict=True)))
            result.fetched += 1
            parts = [result.pred, *(result.features[n] for n in names)]
            flat = torch.cat([p.reshape(-1) for p in parts]).share_memory_()
            replies[client].put(("ok", (flat, [p.shape for p in parts])))
            if result.fetched >= clients:
                del done[key]
            while len(done) > capacity:
                done.popitem(last=False)
    except Exception as e:  # every waiting student gets the reason instead of waiting forever
        message = str(e) if isinstance(e, UserError) else f"the shared teacher failed: {type(e).__name__}: {e}"
        for q in replies:
            q.put(("error", message))


def _next_request(requests: Any) -> Any:
    """The next request; None when told to stop, or when the parent process is gone (killed: nobody will)."""
    import multiprocessing as mp
    import queue

    while True:
        try:
            return requests.get(timeout=5)
        except queue.Empty:
            parent = mp.parent_process()
            if parent is not None and not parent.is_alive():
                return None


@dataclass
class _Result:
    pred: torch.Tensor
    features: dict[str, torch.Tensor]
    fetched: int = 0


def _key(value: Any) -> str:
    """A hash of every tensor's shape, dtype and bytes in a nested structure of tuples, dicts and tensors."""
    h = hashlib.blake2b(digest_size=16)

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (tuple, list)):
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def _shared_copy(value: Any) -> Any:
    """Tensors of a nested structure copied into shared memory now. A queue would otherwise move a tensor's
    storage there later, from its feeder thread, while this process is still computing with it."""
    if isinstance(value, dict):
        return {k: _shared_copy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_shared_copy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).share_memory_()
    return value
