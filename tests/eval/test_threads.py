"""The thread count of one-token decoding steps: measured by ThreadTuner, or fixed by generate.py --threads."""

import sys
from pathlib import Path

import pytest
import torch

from pkmlm.config import Config
from pkmlm.eval.sampling import generate
from pkmlm.eval.threads import ThreadTuner, candidate_counts
from pkmlm.models.transformer import TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import generate as generate_cli  # noqa: E402  (the script at the repository root)


def test_candidate_counts():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(6) == [1, 2, 4, 6]
    assert candidate_counts(8) == [1, 2, 4, 8]


class FakeClock:
    """A clock that advances by the duration a step with the current torch thread count is said to take."""

    def __init__(self, seconds_per_threads):
        self.seconds, self.now, self.started = seconds_per_threads, 0.0, False

    def __call__(self):
        if self.started:  # end of a step: it took the time its thread count costs
            self.now += self.seconds[torch.get_num_threads()]
        self.started = not self.started
        return self.now


@pytest.mark.parametrize("seconds, best", [({1: 1.0, 2: 3.0, 4: 2.0}, 1), ({1: 3.0, 2: 2.0, 4: 1.0}, 4),
                                           ({1: 2.0, 2: 1.0, 4: 1.0}, 2)])  # a tie goes to fewer threads
def test_tuner_measures_each_candidate_in_a_block_and_keeps_the_fastest(seconds, best):
    before = torch.get_num_threads()
    tuner = ThreadTuner(0, trials=3, most=4, clock=FakeClock(seconds))
    seen = []
    for _ in range(12):
        assert tuner.chosen is None
        with tuner.step():
            seen.append(torch.get_num_threads())
    assert seen == [1] * 4 + [2] * 4 + [4] * 4  # a block per candidate: few switches, each one's first step untimed
    assert tuner.chosen == best and torch.get_num_threads() == best  # set once, kept between steps
    with tuner.step():
        assert torch.get_num_threads() == best
    assert tuner.times == {n: [s] * 3 for n, s in seconds.items()}
    tuner.restore()
    assert torch.get_num_threads() == before


def test_the_median_decides_not_one_slow_step():
    durations = iter([1.0, 9.0, 1.0, 2.0, 2.0, 2.0])  # candidate 1: 1, 9, 1 (median 1); candidate 2: 2, 2, 2
    now = [0.0]

    def clock():
        now[0] += next(durations) if clock.started else 0.0
        clock.started = not clock.started
        return now[0]
    clock.started = False
    tuner = ThreadTuner(0, trials=3, most=2, clock=clock)
    for _ in range(8):
        with tuner.step():
            pass
    assert tuner.chosen == 1
    tuner.restore()


def test_fixed_threads_are_not_measured_and_restored():
    before = torch.get_num_threads()
    tuner = ThreadTuner(1, most=4)
    assert tuner.chosen == 1
    with tuner.step():
        assert torch.get_num_threads() == 1
    assert not any(tuner.times.values())
    tuner.restore()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 0"):
        ThreadTuner(-1)


def _model() -> TransformerLM:
    config = Config.from_dict({
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 64},
        "memory": {"positions": ["1:replace"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        "data": {"batch_size": 2, "bptt": 64}, "train": {"max_steps": 1}})
    torch.manual_seed(0)
    return TransformerLM(config, 50).eval()


def test_generate_gives_the_same_tokens_with_any_thread_count_and_restores_torch_threads():
    model, before = _model(), torch.get_num_threads()
    runs = {}
    for threads in (1, 2, 0):
        tuner = ThreadTuner(threads, most=2)
        runs[threads] = generate(model, [1, 5, 7], max_new_tokens=20, window=64, seeds=[0, 1], temperature=0,
                                 threads=tuner)
        assert torch.get_num_threads() == before
        assert tuner.chosen in (1, 2)  # 19 one-token steps: enough to measure 2 candidates x (3 + 1) steps
    assert runs[1] == runs[2] == runs[0]


@pytest.mark.slow
def test_generate_cli_threads(text_run, capsys):
    data_dir, run_dir = text_run
    code = generate_cli.main([str(run_dir), "--prompt", "The minister", "--max-new-tokens", "10", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "1 thread per step" in err and "measured" not in err, err
    code = generate_cli.main([str(run_dir), "--prompt", "x", "--threads", "-1"])
    out, err = capsys.readouterr()
    assert code == 2 and not out and err.count("\n") == 1 and "--threads must be >= 0" in err
