"""The training loop that Textual Inversion, NeTI and HiPer share.

A method's trainer subclasses `Trainer`. Its __init__ calls Trainer.__init__ and sets
`optimizer` (inversion/adam.py) and `images_digest` (inversion.data.image_digest of its
training images); it defines

    loss(step)              the loss of one batch, every random draw seeded by (cfg.seed, step),
                            so that a checkpoint's step is its whole random state;
    learned_state()         what it learned, as the checkpoint's fields ({"vectors": ...});
    load_learned(state)     the reverse, refusing fields that are not what it writes
                            (AlteredCheckpoint);

and may replace `train_step()` (Textual Inversion grows its word first; NeTI adds up the
gradients of several micro-batches). Everything else is here, once: the loop with its progress
bar, checkpoints every `save_every` steps and on Ctrl-C, a resume that checks the file and the
base model, the loss log, and the guards against NaN losses and NaN learned values.
The checkpoint holds the learned fields, the optimizer, `step`, `losses`, and `settings()` under
the key 'config' (`state_dict`); a resume refuses other settings with a TrainingError.
"""
from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import torch

from inversion.data import resume_mismatch
from inversion.files import BaseModel
from ldm.files import LoadError, atomic_write, load_error_reason

MAX_SKIPPED_STEPS = 10  # steps in a row with a NaN or infinite loss that stop a run


class TrainingError(ValueError):
    """Bad settings or data for training; the message is one line."""


class AlteredCheckpoint(Exception):
    """A checkpoint's field is not what this tool writes there (resume() names the file)."""


def restore_tensor(target: torch.Tensor, saved, name: str) -> None:
    """Copy a checkpoint's tensor into a learned one of the same shape (copy_ alone would
    broadcast a (1, D) row over (n, D) vectors without a word)."""
    if not isinstance(saved, torch.Tensor) or saved.shape != target.shape:
        got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise AlteredCheckpoint(f"{name} is {got}, this run learns {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(saved)


def restore_progress(state: dict) -> tuple:
    """(step, losses) of a checkpoint, every method's: a step number >= 0 and (step, loss) rows."""
    step, losses = state["step"], state["losses"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise AlteredCheckpoint(f"step {step!r} is not a step number")
    if not isinstance(losses, torch.Tensor) or losses.dim() != 2 or losses.shape[1] != 2:
        raise AlteredCheckpoint("losses is not a table of (step, loss) rows")
    if not torch.isfinite(losses).all():  # a NaN loss is skipped, never logged
        raise AlteredCheckpoint("losses holds NaN or infinite values")
    return step, [tuple(r) for r in losses.tolist()]


def check_restored(optimizer) -> None:
    """After a resume: the learned values and Adam's moments must be finite numbers (training
    never saves others: check_finite stops a run before its checkpoint)."""
    tensors = [*optimizer.params, *(m for s in optimizer.state.values() for m in (s["exp_avg"], s["exp_avg_sq"]))]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise AlteredCheckpoint("it holds NaN or infinite values")


class Trainer:
    """The loop and the files of a training run (see the module docstring). `run()` trains to
    cfg.steps."""

    progress_label = "training"
    base_model: Optional[BaseModel] = None  # set by the command line: checked on resume, recorded in checkpoints

    def __init__(self, model, cfg, out: Path, log: Callable[[str], None] = print):
        self.model, self.cfg, self.out, self.log = model, cfg, Path(out), log
        self.step = 0
        self.losses: List[tuple] = []  # (step, loss) of every step whose loss was finite
        self.checkpoint_path = self.out / "checkpoint.pt"

    # ------------------------------------------------------------------ one step
    def train_step(self) -> Optional[float]:
        return self.gradient_step()

    def gradient_step(self) -> Optional[float]:
        """One optimizer step on one batch's loss; a non-finite loss skips the step with a warning.
        The step is counted once its update is made: a Ctrl-C during the backward pass saves the
        previous step's state under the previous step's number, and a resumed run redoes it."""
        loss = self.loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.step += 1
            self.log(f"warning: step {self.step}: loss is {loss.item()}, step skipped")
            return None
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    # ------------------------------------------------------------------ state
    # Settings a resumed run may change: it may run longer, or save and sample at other steps.
    FREE_SETTINGS = ("steps", "save_every", "sample_every", "sample_steps")
    digest_key = "images"  # the name of the training images' digest in settings() (checkpoint["config"])

    def settings(self) -> str:
        """The settings a resumed run must share, and its training images (their digest)."""
        fixed = {k: v for k, v in asdict(self.cfg).items() if k not in self.FREE_SETTINGS}
        return str({**fixed, self.digest_key: self.images_digest})

    def state_dict(self) -> dict:
        """A checkpoint: what the method learned, the optimizer's moments, the step, the losses
        so far and the settings a resumed run must share."""
        return {**self.learned_state(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "config": self.settings(), "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2)}

    def load_state_dict(self, state: dict) -> None:
        """The reverse of state_dict, after checking that the run's settings are the same."""
        mismatch = resume_mismatch(self.checkpoint_path, state.get("config"), self.settings())
        if mismatch:
            raise TrainingError(mismatch)
        self.load_learned(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses = restore_progress(state)

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        if self.base_model is not None:  # the model a resumed run must train on
            state["base_model"] = self.base_model.metadata()
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut short by a full disk, or not ours
            raise LoadError(f"{self.checkpoint_path} is damaged ({load_error_reason(e)}); delete it to start "
                            "again, or choose another --out") from None
        if not isinstance(state, dict) or "config" not in state:
            raise LoadError(f"{self.checkpoint_path} is not a checkpoint of this tool; delete it or choose another --out")
        altered = f"{self.checkpoint_path} is an incomplete or altered checkpoint"
        saved = state.get("base_model")
        if saved is not None and not (isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values())):
            raise LoadError(f"{altered} (its base_model is not text); delete it to start again, or choose another "
                            "--out")
        if saved is not None and self.base_model is not None and not self.base_model.recognises(saved):
            raise LoadError(f"{self.checkpoint_path} was trained on another base model "
                            f"({self.base_model.difference(saved)}); resume with the --ckpt it was trained on "
                            f"({saved.get('base_model', 'named in it')}), or start a new --out folder")
        try:
            self.load_state_dict(state)
            check_restored(self.optimizer)
        except TrainingError:  # other settings or images, or another method's run: its own message
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, AlteredCheckpoint) as e:
            # a key missing, a tensor of another shape, a number where a table was saved, NaN values
            what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else load_error_reason(e)
            raise LoadError(f"{altered} ({what}); delete it to start again, or choose another --out") from None
        return True

    def write_loss_log(self) -> None:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "loss"])
                w.writerows((int(s), f"{l:.6f}") for s, l in self.losses)
        try:
            atomic_write(self.out / "loss.csv", write)
        except OSError as e:  # held open elsewhere (a spreadsheet, on Windows): the losses stay in memory
            self.log(f"warning: could not write {self.out / 'loss.csv'} ({e}); it is written again at the next save")

    # ------------------------------------------------------------------ loop
    def check_finite(self) -> None:
        """Stop, before anything is saved, if a step has made the learned numbers NaN or infinite
        (a learning rate too large for the precision, say): the last checkpoint keeps the last good ones."""
        if not torch.stack([torch.isfinite(p).all() for p in self.optimizer.params]).all():  # one sync on a GPU
            raise TrainingError(f"step {self.step} made the learned values NaN or infinite (learning rate "
                                f"{self.optimizer.lr:g}); nothing of it was saved: lower --lr and start again")

    def run(self, on_save: Callable[["Trainer"], None] = lambda t: None,
            on_sample: Callable[["Trainer"], None] = lambda t: None, progress: bool = True) -> None:
        """Train until cfg.steps; checkpoint and call `on_save` every save_every steps and at the
        end, `on_sample` every sample_every steps and at the end (once, when the two meet); on
        Ctrl-C, save what was learned and re-raise."""
        from ldm.cli import progress_bar
        cfg = self.cfg
        bar = progress_bar(cfg.steps, self.progress_label, initial=self.step, disable=not progress)
        skipped = 0  # steps in a row whose loss was NaN or infinite
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                self.check_finite()
                skipped = skipped + 1 if loss is None else 0
                if skipped == MAX_SKIPPED_STEPS:  # one such step is bad luck; this many, a run that has diverged
                    raise TrainingError(f"the loss was NaN or infinite at each of the last {skipped} steps, to step "
                                        f"{self.step} (learning rate {self.optimizer.lr:g}): the run has diverged; "
                                        "lower --lr and start again")
                if loss is not None:
                    self.losses.append((self.step, loss))
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                    on_save(self)  # the learned files first: the log is the least of them
                    self.write_loss_log()
                if (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == cfg.steps:
                    on_sample(self)
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            on_save(self)
            self.write_loss_log()
            raise
        except Exception:
            bar.close()  # so that the error's line starts a line of its own
            raise
        bar.close()
