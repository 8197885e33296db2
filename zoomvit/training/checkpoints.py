"""Checkpoints written whole or not at all: the Trainer writes each one under a staging folder beside the others,
and it is renamed into place (one atomic step) once every file is in. A write that fails (a full disk) leaves the
earlier checkpoints as they were, and --resume takes the last complete one."""

from __future__ import annotations

import errno
import os
import shutil

from zoomvit.errors import ZoomViTError

STAGING = ".partial"  # inside the checkpoints folder: not a checkpoint-N name, so never taken for one


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a full disk: torch.save and safetensors re-raise the OSError as their
    own error, with its text."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(folder) -> ZoomViTError:
    return ZoomViTError(
        f"Disk full while writing to {folder}: the last complete checkpoint is kept; free some space and run the "
        "same command with --resume."
    )


def save_atomically(trainer, save, model, trial) -> None:
    """`save` (the Trainer's own _save_checkpoint) into the staging folder, then the checkpoint renamed into place,
    the Trainer's record of the best one pointed at it, and the old ones rotated out as the Trainer would."""
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    folder = args.output_dir
    staging = os.path.join(folder, STAGING)
    args.output_dir = staging
    try:
        save(model, trial)
    except BaseException as exc:  # a Ctrl-C too: no half checkpoint is left behind
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if disk_full(exc):
            raise disk_full_error(folder) from None
        raise
    finally:
        args.output_dir = folder
    trainer.accelerator.wait_for_everyone()  # every process's RNG state file is in before the folder moves
    name = f"checkpoint-{trainer.state.global_step}"
    staged, final = os.path.join(staging, name), os.path.join(folder, name)
    state = trainer.state
    # every process keeps this record (each loads the best weights at the end), so every process points it at the
    # checkpoint's place after the move
    best_is_new = bool(state.best_model_checkpoint) and os.path.dirname(state.best_model_checkpoint) == staging
    if best_is_new:
        state.best_model_checkpoint = final
    if args.should_save:
        if best_is_new:
            state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if os.path.isdir(final):  # the same step saved again: the new one replaces it
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(
            output_dir=folder,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    trainer.accelerator.wait_for_everyone()
