"""The shared teacher process: the same outputs as a local teacher, and no student waits forever for it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from distill_sd.errors import UserError
from distill_sd.kd import TeacherForward
from distill_sd.shared_teacher import SharedTeacher


def _inputs(unet, seed):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return noisy, torch.tensor([10, 900]), {"encoder_hidden_states": embeds}


def test_clients_get_the_local_teachers_outputs_and_the_blocks_they_ask_for(narrow_dirs):
    from distill_sd.models import load_teacher

    unet = load_teacher(narrow_dirs["sd15"]).unet.eval()
    local = TeacherForward(unet, ["up_blocks.1", "down_blocks.0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the teacher process: the same kernels, the same bits
    try:
        _compare(narrow_dirs, unet, local)
    finally:
        torch.set_num_threads(threads)  # later tests compare runs made in this process with subprocesses


def _compare(narrow_dirs, unet, local):
    with SharedTeacher(str(narrow_dirs["sd15"]), clients=2) as shared:
        first, second = shared.client(0).tap(["up_blocks.1", "down_blocks.0"]), shared.client(1).tap(["mid_block"])
        for seed in (0, 1):
            inputs = _inputs(unet, seed)
            pred, feats = local(*inputs)
            pending = [first.submit(*inputs), second.submit(*inputs)]  # both in flight, one forward
            (p1, f1), (p2, f2) = pending[0](), pending[1]()
            assert torch.equal(p1, pred) and torch.equal(p2, pred)
            assert len(f1) == 2 and all(torch.equal(a, b) for a, b in zip(f1, feats))
            assert len(f2) == 1 and f2[0].shape[1] == unet.config.block_out_channels[-1]


def test_a_teacher_that_cannot_load_or_dies_is_reported_to_the_waiting_student(narrow_dirs, tmp_path):
    unet_like = type("U", (), {"config": type("C", (), {"in_channels": 4, "cross_attention_dim": 32})})
    with SharedTeacher(str(tmp_path / "no-teacher"), clients=1) as shared:
        with pytest.raises(UserError, match="no-teacher"):
            shared.client(0).submit(*_inputs(unet_like, 0))()
    with SharedTeacher(str(narrow_dirs["sd15"]), clients=1) as shared:
        os.kill(shared.process.pid, signal.SIGKILL)
        while shared.process.exitcode is None:
            time.sleep(0.05)
        shared.check()  # what distill_in_parallel does while its students run
        with pytest.raises(UserError, match="died"):
            shared.client(0).submit(*_inputs(unet_like, 0))()
