"""Files written atomically: a temporary file in the same folder, fsync, rename. A run killed at any
moment leaves either the old file or the new one, never half of one. Checkpoints, the JSONL metrics log,
preference pairs, the tokenizer and data caches are all written this way."""
import contextlib
import os


def atomic_write(path, write_fn):
    """Write via write_fn(file) to a temporary file in the same directory, flush,
    fsync, then rename over path: a crash leaves either the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    remove_stale_temps(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(path):
    """Delete the path.tmp<pid> files of processes that no longer run: a run killed mid-write
    leaves its temporary file behind, and each can be as large as a checkpoint."""
    folder, name = os.path.split(os.fspath(path))
    for entry in os.listdir(folder or "."):
        pid = entry[len(name) + 4:]
        if entry.startswith(name + ".tmp") and pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
