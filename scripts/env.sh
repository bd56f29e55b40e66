# Source this to build with cargo directly: `. scripts/env.sh && cargo build`.
# It installs (once) and activates the cached torch virtualenv that tch builds against, and
# Debian's libgloo-dev, whose headers build.rs compiles cpp/ against (the Makefile's deps
# installs it too).
_simile_venv="$("$(dirname "${BASH_SOURCE[0]}")/bootstrap-torch.sh")" || return 1
"$(dirname "${BASH_SOURCE[0]}")/bootstrap-apt.sh" libgloo-dev || return 1
export PATH="$_simile_venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _simile_venv
