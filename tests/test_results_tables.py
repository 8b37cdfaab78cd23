"""The README's results commands run end to end (on a random checkpoint, a few steps) and
report means over seeds that agree with their per-seed columns."""
import re

import pytest
import torch

from conftest import ROOT, write_random_checkpoint
from ldm.cli import CLIError


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt32"), image_size=32, seed=4)


def percents(text):
    return [int(x) / 100 for x in re.findall(r"(\d+)%", text)]


def distinct_scores(monkeypatch, module, name):
    """Wrap the scorer module.name so that each call, after running the real one, returns other
    known whole percents: on a random model every real score is 0%, which any mean would match."""
    real, calls = getattr(module, name), []

    def scorer(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append(name)
        return {key: ((len(calls) * 37 + i * 11) % 97) / 100 for i, key in enumerate(scores)}
    monkeypatch.setattr(module, name, scorer)
    return calls


def check_means(line, between=0):
    """A row `| ... | rec | edit | r0 / e0, r1 / e1 | ...`, with `between` columns after edit
    (NeTI's table: "edit & concept"): the means equal the per-seed averages, which differ from
    seed to seed."""
    cells = [c.strip() for c in line.strip("|").split("|")]
    i = next(k for k, c in enumerate(cells) if " / " in c)
    per_seed = [percents(pair) for pair in cells[i].split(",")]
    (rec,), (edit,) = percents(cells[i - 2 - between]), percents(cells[i - 1 - between])
    assert len(per_seed) == 2 and all(len(p) == 2 for p in per_seed)
    assert per_seed[0] != per_seed[1] and rec + edit > 0, line
    assert rec == pytest.approx(sum(p[0] for p in per_seed) / 2, abs=0.006)
    assert edit == pytest.approx(sum(p[1] for p in per_seed) / 2, abs=0.006)


def test_ti_results_table(ckpt32, tmp_path, capsys, monkeypatch):
    from tinyworld import concepts, ti_results
    words, contexts = (distinct_scores(monkeypatch, concepts, name) for name in ("evaluate_word", "evaluate_context"))
    assert ti_results.main(["--ckpt", str(ckpt32), "--steps", "2", "--n", "2", "--sample-steps", "2",
                            "--seeds", "0", "1", "--out", str(tmp_path / "o")]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "%" in l]
    labels = [l.split("|")[2].strip() for l in rows]
    assert sum(l.startswith("baseline") for l in labels) == 3          # ring, hourglass, checkered
    for label in ("single vector", "multi-vector (3)", "style: single vector"):
        assert label in labels
    context = [l for l in rows if "whole context" in l]
    assert rows[-2:] == context and [l.split("|")[1].strip() for l in context] == ["ring", "checkered"]
    for line in rows[:-2]:
        check_means(line)
    for line in context:  # a reconstruction per seed and their mean, no editability (no word to edit with)
        cells = [c.strip() for c in line.strip("|").split("|")]
        per_seed = [pair.split(" / ") for pair in cells[4].split(",")]
        assert cells[3] == "-" and [e.strip() for _, e in per_seed] == ["-", "-"]
        assert percents(cells[2])[0] == pytest.approx(sum(percents(r)[0] for r, _ in per_seed) / 2, abs=0.006)
        assert percents(per_seed[0][0]) != percents(per_seed[1][0])
    assert words and contexts  # every score of the table went through the wrappers
    runs = sorted(p.name for p in (tmp_path / "o").iterdir())  # a run's folder per row and seed, named by the row
    assert runs == sorted(f"{row}-seed{s}" for row in ti_results.ROWS for s in (0, 1)), runs


def test_ti_results_runs_on_the_threads_asked_for(ckpt32, tmp_path, capsys, monkeypatch):
    """--threads sets torch's thread count (the README's tables: 2), and the header says it."""
    import torch
    from tinyworld import ti_results
    threads, learn_context = [], ti_results.learn_context
    monkeypatch.setattr(ti_results, "learn_context",
                        lambda *a, **k: threads.append(torch.get_num_threads()) or learn_context(*a, **k))
    for n in (1, 2):
        assert ti_results.main(["--ckpt", str(ckpt32), "--rows", "ring-context", "--no-baseline", "--steps", "1",
                                "--n", "1", "--sample-steps", "1", "--seeds", "0", "--threads", str(n),
                                "--out", str(tmp_path / "o")]) == 0
        assert f"; {n} torch thread{'s' * (n > 1)}\n" in capsys.readouterr().out
    assert threads == [1, 2]


def test_ti_results_learns_from_the_number_of_images_asked_for(ckpt32, tmp_path, capsys, monkeypatch):
    """--num-images: how many rendered images each word and each context learns from (5 by default)."""
    from tinyworld import ti_results, world
    asked, render = [], world.concept_images
    monkeypatch.setattr(world, "concept_images", lambda concept, n, **kw: asked.append(n) or render(concept, n, **kw))
    common = ["--ckpt", str(ckpt32), "--steps", "1", "--n", "1", "--sample-steps", "1", "--seeds", "0",
              "--rows", "ring", "ring-context", "--no-baseline"]
    assert ti_results.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "5 images per concept and seed, 1 step," in capsys.readouterr().out and asked[-2:] == [5, 5]
    assert ti_results.main([*common, "--num-images", "7", "--out", str(tmp_path / "b")]) == 0
    assert "7 images per concept and seed" in capsys.readouterr().out and asked[-2:] == [7, 7]


def test_ti_results_scores_with_the_given_guidance(ckpt32, tmp_path, capsys, monkeypatch):
    """--scale reaches every score of the table: the words', the baseline's and the context's."""
    from tinyworld import concepts, ti_results
    seen = []
    for name in ("evaluate_word", "evaluate_context"):
        real = getattr(concepts, name)
        monkeypatch.setattr(concepts, name, lambda *a, _real=real, **kw: seen.append(kw["scale"]) or _real(*a, **kw))
    assert ti_results.main(["--ckpt", str(ckpt32), "--steps", "1", "--n", "2", "--sample-steps", "1", "--seeds", "0",
                            "--rows", "ring", "ring-context", "--scale", "2.5", "--out", str(tmp_path / "o")]) == 0
    assert "guidance 2.5" in capsys.readouterr().out
    # the baseline's candidate words, its row, the word and the context
    assert len(seen) == len(concepts.BASELINE_WORDS["shape"]) + 3 and set(seen) == {2.5}


def test_learn_context_trains_only_the_context(ckpt32):
    """The whole-context comparison row: a (77, D) context that starts at the text encoder's output
    for "a photo of a object", moves with training, is the same for the same seed, and leaves the
    model's weights as they were."""
    import ldm
    import torch
    from tinyworld.ti_results import learn_context
    model = ldm.load(ckpt32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = model.encode_prompts(["a photo of a object"]).float()[0]
    assert torch.equal(learn_context(model, "ring", 0, seed=0), start)
    a, b = learn_context(model, "ring", 3, seed=0), learn_context(model, "ring", 3, seed=0)
    assert a.shape == (77, model.config.text.hidden_size) and torch.equal(a, b)
    assert not torch.allclose(a, start)
    assert not torch.equal(learn_context(model, "ring", 3, seed=1), a)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


def test_neti_results_table(ckpt32, tmp_path, capsys, monkeypatch):
    from tinyworld import neti_results
    for scorer in ("score_ti", "score_neti"):
        distinct_scores(monkeypatch, neti_results, scorer)
    grid = tmp_path / "grid.png"
    assert neti_results.main(["--ckpt", str(ckpt32), "--steps", "2", "--every", "1", "--n", "2",
                              "--sample-steps", "2", "--seeds", "0", "1", "--truncations", "4", "128",
                              "--grid", str(grid), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in out
    final = [l for l in out.splitlines() if l.startswith("| Textual Inversion") or l.startswith("| NeTI (mapper")]
    assert len(final) == 2
    for line in final:
        check_means(line, between=1)  # the columns were taken one off, which all-0% rows could not show
    assert "| 4 |" in out and "| 128 (full, table 1) |" in out and grid.exists()


def test_neti_results_jobs_give_the_same_tables_and_the_paired_differences_add_up(tmp_path, capsys):
    """Seeds in worker processes (--jobs 2) score exactly as one after the other; the paired rows
    are the per-seed differences NeTI - TI's final, averaged. The shipped model, so that the
    scores are not all 0%."""
    from tinyworld import neti_results
    argv = ["--steps", "2", "--every", "1", "--n", "8", "--sample-steps", "8", "--seeds", "0", "1", "2",
            "--truncations", "4", "128"]

    def tables(jobs):
        assert neti_results.main(argv + ["--jobs", jobs, "--out", str(tmp_path / jobs)]) == 0
        rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
        return [l.rsplit(" | ", 1)[0] if l.endswith(" s a seed |") else l for l in rows]   # timings differ

    one, two = tables("1"), tables("2")
    assert one == two
    # bit for bit: each seed computes with the same threads either way (--threads, default 1)
    mapper = lambda jobs, seed: torch.load(tmp_path / jobs / f"ring-neti-seed{seed}" / "checkpoint.pt",
                                           weights_only=True)["mapper"]
    for seed in (0, 1, 2):
        assert all(torch.equal(mapper("1", seed)[k], mapper("2", seed)[k]) for k in mapper("1", seed))
    per_seed = {name: [percents(pair) for pair in
                       next(l for l in one if l.startswith(name)).split(" | ")[5].split(",")]
                for name in ("| Textual Inversion", "| NeTI (mapper")}
    assert any(score > 0 for seed in per_seed["| NeTI (mapper"] for score in seed)
    paired = next(l for l in one if l.startswith("| 2 | ") and "±" in l)
    for k, cell in enumerate(paired.strip("| ").split(" | ")[1:]):
        want = sum(100 * (n[k] - t[k]) for n, t in zip(per_seed["| NeTI (mapper"], per_seed["| Textual Inversion"])) / 3
        assert float(cell.split(" ± ")[0]) == pytest.approx(want, abs=0.051)



def test_ctrl_c_during_neti_results_jobs_is_one_line_and_stops_the_workers(tmp_path):
    """Ctrl-C reaches the whole process group, as from a terminal: the main process ends with one
    "interrupted" line and status 130, the workers stop at once and print nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time
    cmd = [sys.executable, "-m", "tinyworld.neti_results", "--jobs", "2", "--seeds", "0", "1", "--steps", "400",
           "--n", "8", "--sample-steps", "8", "--truncations", "128", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().startswith("# NeTI vs Textual Inversion")  # the pool starts next
    time.sleep(8)  # the workers are training
    os.killpg(proc.pid, signal.SIGINT)
    start = time.time()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.time() - start < 30  # 400 steps of two seeds would take minutes
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "tinyworld.neti_results: interrupted"

def test_evaluate_prints_the_three_tables(ckpt32, capsys):
    from importlib import import_module
    evaluate = import_module("tinyworld.evaluate")   # the package's `evaluate` name is the analyzer's function
    assert evaluate.main(["--ckpt", str(ckpt32), "--n", "4", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "4 prompts of held-out combinations" in out and "1 prompts naming a texture" in out
    assert "| texture (textured only) |" in out
    from ldm.cli import run
    assert run(evaluate.main, ["--ckpt", str(ckpt32), "--device", "tpu9"], prog="tinyworld.evaluate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tinyworld.evaluate: error: unknown device 'tpu9'; use auto, cpu, cuda, cuda:N or mps"]
    assert len([l for l in out.splitlines() if l.startswith("| ") and l.endswith("% |")]) == 5 + 3 + 5 + 3
    assert "| texture: striped |" in out and "| texture: dotted |" in out and "| texture: checkered |" in out


def test_ti_results_lr_reaches_every_trainer_and_a_bad_one_is_refused(ckpt32, tmp_path, monkeypatch, capsys):
    from tinyworld import ti_results
    seen, learn = [], ti_results.learn

    def recording(*args, **kwargs):
        trainer = learn(*args, **kwargs)
        seen.append(trainer.cfg.lr)
        return trainer

    monkeypatch.setattr(ti_results, "learn", recording)
    assert ti_results.main(["--ckpt", str(ckpt32), "--steps", "1", "--n", "2", "--sample-steps", "1",
                            "--seeds", "0", "--lr", "2.5e-3", "--out", str(tmp_path / "o")]) == 0
    assert "base lr 0.0025" in capsys.readouterr().out
    assert len(seen) == len(ti_results.ROWS) and set(seen) == {2.5e-3}
    with pytest.raises(CLIError, match="argument --lr: must be > 0 and at most 1"):
        ti_results.main(["--ckpt", str(ckpt32), "--lr", "5", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_neti_results_lr_reaches_the_mapper_only_and_a_bad_one_is_refused(ckpt32, tmp_path, monkeypatch, capsys):
    from inversion.neti_cli import TINY_DEFAULTS
    from tinyworld import neti_results
    seen = {}
    for name in ("start_ti", "start_neti"):
        original = getattr(neti_results, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            trainer = _original(*args, **kwargs)
            seen[_name] = trainer.cfg.lr
            return trainer
        monkeypatch.setattr(neti_results, name, recording)
    assert neti_results.main(["--ckpt", str(ckpt32), "--steps", "1", "--every", "1", "--n", "2",
                              "--sample-steps", "1", "--truncations", "128", "--seeds", "0",
                              "--neti-lr", "3e-3", "--out", str(tmp_path / "o")]) == 0
    assert "NeTI's base lr 0.003" in capsys.readouterr().out
    assert seen["start_neti"] == 3e-3
    assert seen["start_ti"] != 3e-3 and TINY_DEFAULTS["lr"] != 3e-3
    with pytest.raises(CLIError, match="argument --neti-lr: must be > 0 and at most 1"):
        neti_results.main(["--ckpt", str(ckpt32), "--neti-lr", "-1", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("module, argv, message", [
    ("tinyworld.train", ["--lr", "0"], "argument --lr: must be > 0 and at most 1"),
    ("tinyworld.train", ["--batch", "0"], "argument --batch: must be at least 1"),
    ("tinyworld.train", ["--ema", "-5"], "argument --ema: must be between 0 and 1"),    # exported inf and NaN
    # were tracebacks, or errors found only after all the work
    ("tinyworld.ti_results", ["--seeds", "-1"], "argument --seeds: must be between 0 and 2**63 - 1"),
    ("tinyworld.ti_results", ["--seeds", "0", "0"], "give each seed once"),
    ("tinyworld.ti_results", ["--n", "1"], "--no-baseline"),
    ("tinyworld.ti_results", ["--rows", "ring-context", "--lr", "1e-3"], "--context-lr"),
    ("tinyworld.ti_results", ["--out", "a-file/ti"], "--out a-file/ti: cannot make a folder there"),
    ("tinyworld.neti_results", ["--seeds", "-1"], "argument --seeds"),
    ("tinyworld.neti_results", ["--grid", "g.txt"], "argument --grid: g.txt: name a .png"),
    ("tinyworld.neti_results", ["--grid", "a-file/g.png"], "--grid a-file/g.png: cannot write there"),
    ("tinyworld.evaluate", ["--grid", "g.txt"], "argument --grid: g.txt: name a .png"),
    ("tinyworld.evaluate", ["--grid", "."], "argument --grid: .: name a .png"),
    ("tinyworld.hiper_eval", ["--grid", "a-file/g.png"], "--grid a-file/g.png: cannot write there"),
    ("tinyworld.hiper_eval", ["--tail", "100"], "--tail must be between 1 and 75"),
    ("tinyworld.hiper_eval", ["--alphas", "0.5,nan"], "each α must be between 0 and 10"),
    ("tinyworld.world", ["--grid", "g.txt"], "argument --grid: g.txt: name a .png"),
    ("tinyworld.world", ["-n", str(10 ** 20)], "argument -n: must be between 1 and 10000"),  # a traceback
    ("tinyworld.evaluate", ["--n", "0"], "argument --n: must be at least 1"),        # was a traceback
    ("tinyworld.evaluate", ["--steps", "0"], "argument --steps: must be at least 1"),  # was a traceback
    ("tinyworld.ti_results", ["--n", "0"], "argument --n: must be at least 1"),      # was a traceback
    ("tinyworld.neti_results", ["--every", "-1"], "argument --every: must be >= 0"),
    ("tinyworld.neti_results", ["--jobs", "0"], "argument --jobs: must be at least 1"),
    ("tinyworld.hiper_eval", ["--lr", "0"], "argument --lr: must be > 0 and at most 1"),  # trained with lr 0
    ("tinyworld.neti_results", ["--truncations", "4", "999"], "between 1 and 128"),  # failed after training
    ("tinyworld.neti_results", ["--grid-truncation", "0", "--grid", "g.png"], "between 1 and 128"),
    # an option that the other options make useless was ignored without a word
    ("tinyworld.neti_results", ["--grid-truncation", "8"], "give --grid too"),
    ("tinyworld.ti_results", ["--rows", "ring", "--context-lr", "1e-3"], "--context-lr"),
    ("tinyworld.hiper_eval", ["--no-ti", "--ti-steps", "3"], "--no-ti"),
    ("tinyworld.hiper_eval", ["--texture-ceiling", "--steps", "3"], "--texture-ceiling does not use it"),
    # DDIM steps past the schedule were a traceback after all the training
    ("tinyworld.evaluate", ["--steps", "1001"], "--steps 1001: at most 1000, the model's training timesteps"),
    ("tinyworld.ti_results", ["--sample-steps", "1001"], "--sample-steps 1001: at most 1000"),
    ("tinyworld.neti_results", ["--sample-steps", "1001"], "--sample-steps 1001: at most 1000"),
    ("tinyworld.hiper_eval", ["--sample-steps", "1001"], "--sample-steps 1001: at most 1000"),
    ("tinyworld.ti_results", ["--threads", "100000"], "--threads: must be between 1 and 1024"),  # crashed torch
    ("tinyworld.hiper_eval", ["--alphas", "0.5,1e38"], "each α must be between 0 and 10"),  # black images
    ("tinyworld.hiper_eval", ["--alphas", ","], "give at least one α"),  # ran the main table's α alone
])
def test_research_commands_refuse_bad_numbers_and_useless_options(module, argv, message, capsys, tmp_path,
                                                                   monkeypatch):
    import importlib
    from ldm.cli import run
    monkeypatch.chdir(tmp_path)           # were the input let through, its outputs land here
    (tmp_path / "a-file").write_text("")  # a file where a folder is asked for
    main = importlib.import_module(module).main
    rc = run(main, argv, prog=module)     # refused before anything is loaded or trained
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # and nothing written


@pytest.mark.parametrize("module, steps_flag", [("tinyworld.evaluate", "--steps"),
                                               ("tinyworld.ti_results", "--sample-steps"),
                                               ("tinyworld.neti_results", "--sample-steps"),
                                               ("tinyworld.hiper_eval", "--sample-steps")])
def test_research_commands_refuse_a_model_that_is_not_the_tiny_worlds(module, steps_flag, tmp_path, capsys,
                                                                     monkeypatch):
    import importlib
    from conftest import write_random_checkpoint
    from ldm.cli import run
    big = write_random_checkpoint(tmp_path / "big", image_size=128)
    monkeypatch.chdir(tmp_path)
    rc = run(importlib.import_module(module).main, ["--ckpt", str(big), steps_flag, "2"], prog=module)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a 128-px model; the tiny world needs the tiny model" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # runpy, on a module imported before
@pytest.mark.parametrize("module", ["tinyworld.evaluate", "tinyworld.ti_results", "tinyworld.neti_results",
                                    "tinyworld.hiper_eval"])
def test_research_commands_out_of_memory_advice_names_no_option_they_lack(module, monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    import tinyworld.tools

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(tinyworld.tools, "load_tiny_model", no_memory)  # what the command imports as it runs
    monkeypatch.setattr(sys, "argv", [module])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__")  # as `python -m`, with the command's own advice
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and "Tried to allocate 20.00 MiB" in err and "well under 1 GiB" in err, err
    assert "--resolution" not in err and "--batch" not in err


def test_ti_results_runs_only_the_rows_asked_for(ckpt32, tmp_path, monkeypatch, capsys):
    from tinyworld import ti_results
    trained, learn = [], ti_results.learn

    def recording(model, concept, *args, **kwargs):
        trained.append((concept, kwargs.get("num_vectors", 1)))
        return learn(model, concept, *args, **kwargs)

    monkeypatch.setattr(ti_results, "learn", recording)
    assert ti_results.main(["--ckpt", str(ckpt32), "--steps", "1", "--n", "2", "--sample-steps", "1",
                            "--seeds", "0", "--rows", "ring-multi", "hourglass", "--no-baseline",
                            "--out", str(tmp_path / "o")]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and l.endswith(" s |")]
    assert trained == [("ring", 3), ("hourglass", 1)]
    assert len(rows) == 2 and "multi-vector (3)" in rows[0] and rows[1].startswith("| hourglass |")
    with pytest.raises(CLIError, match="invalid choice: 'square'"):
        ti_results.main(["--ckpt", str(ckpt32), "--rows", "square"])
