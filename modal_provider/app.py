"""The Modal app `nightshift-provider`: the sandbox image, the signed web endpoint (provider contract v1) and the background worker for boots, builds and sweeps."""

from __future__ import annotations

import os
from pathlib import Path

import modal

from nightshift_modal.backend import Config, ModalBackend, supervisor_env_from
from nightshift_modal.http import ProviderApp
from nightshift_modal.modal_adapter import FunctionSpawner, ModalDictStore, ModalSandboxes
from nightshift_modal.sealing import derive_key

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENCODE_VERSION = "1.18.33"  # as package.json
BASE_IMAGE_KEY = "config:base_image"

app = modal.App("nightshift-provider")
# PROVIDER_SECRET (the same value as the Worker's), plus model keys (kept here: sandboxes reach them only through
# the model proxy) and NIGHTSHIFT_* settings for the supervisors.
provider_secret = modal.Secret.from_name("nightshift-provider")
state = modal.Dict.from_name("nightshift-provider-state", create_if_missing=True)

# What every sandbox starts from: Debian slim, git, the supervisor built from this repository, and OpenCode.
sandbox_image = (
    modal.Image.debian_slim()
    .apt_install("git", "curl", "ca-certificates", "ripgrep", "build-essential", "pkg-config", "npm")
    .run_commands("curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal")
    .add_local_file(REPO_ROOT / "Cargo.toml", "/src/Cargo.toml", copy=True)
    .add_local_file(REPO_ROOT / "Cargo.lock", "/src/Cargo.lock", copy=True)
    .add_local_dir(REPO_ROOT / "src", "/src/src", copy=True)
    .add_local_dir(REPO_ROOT / "core", "/src/core", copy=True)
    .add_local_dir(REPO_ROOT / "sandbox", "/src/sandbox", copy=True)
    .add_local_dir(REPO_ROOT / "tests", "/src/tests", copy=True)
    .run_commands(
        "cd /src && /root/.cargo/bin/cargo build --release -p nightshift-sandbox --bin nightshift-supervisor"
        " && install -m 755 target/release/nightshift-supervisor /usr/local/bin/nightshift-supervisor"
        " && rm -rf /src /root/.cargo/registry"
    )
    .run_commands(
        "mkdir -p /opt/opencode && cd /opt/opencode && npm install --no-audit --no-fund --ignore-scripts"
        f" opencode-linux-x64@{OPENCODE_VERSION} @opencode-ai/plugin@{OPENCODE_VERSION}"
    )
    .env(
        {
            "NIGHTSHIFT_OPENCODE_BIN": "/opt/opencode/node_modules/opencode-linux-x64/bin/opencode",
            "NIGHTSHIFT_PLUGIN_MODULES": "/opt/opencode/node_modules",
        }
    )
)

# What the provider's own functions run on: Python and this package (the modal SDK is provided by Modal).
function_image = modal.Image.debian_slim(python_version="3.11").add_local_python_source("nightshift_modal")


def _base_image_id() -> str:
    image_id = state.get(BASE_IMAGE_KEY)
    if image_id is None:
        raise RuntimeError(
            "no sandbox image is published: run `modal run modal_provider/app.py::publish_sandbox_image`"
        )
    return image_id["id"]


def _public_url() -> str:
    """The web endpoint's URL (sandboxes reach the model proxy there): PROVIDER_PUBLIC_URL, or what Modal reports."""
    url = os.environ.get("PROVIDER_PUBLIC_URL") or web.get_web_url()
    if not url:
        raise RuntimeError("the provider's web endpoint has no URL: deploy the app, or set PROVIDER_PUBLIC_URL")
    return url


def _backend() -> ModalBackend:
    secret = os.environ.get("PROVIDER_SECRET", "")
    if not secret:
        raise RuntimeError("PROVIDER_SECRET is missing from the `nightshift-provider` Modal secret")
    return ModalBackend(
        api=ModalSandboxes(app, _base_image_id),
        store=ModalDictStore(state),
        spawner=FunctionSpawner(run_job),
        config=Config(
            supervisor_env=supervisor_env_from(os.environ),
            state_key=derive_key(secret.encode()),
            model_proxy_url=_public_url(),
            dev_mode=os.environ.get("PROVIDER_DEV_MODE") == "1",
        ),
    )


@app.function(image=function_image, secrets=[provider_secret], timeout=4 * 3600)
def run_job(job: str, target: str, generation: int) -> None:
    """Boots a sandbox or builds an image (spawned by the web endpoint)."""
    _backend().run_job(job, target, generation)


@app.function(image=function_image, secrets=[provider_secret], schedule=modal.Period(minutes=1), timeout=600)
def sweep() -> None:
    """Lifetimes, dead sandboxes, expired snapshots and unneeded images, every minute."""
    _backend().sweep()


@app.function(image=function_image, secrets=[provider_secret], timeout=3600)
@modal.concurrent(max_inputs=100)
@modal.asgi_app()
def web() -> ProviderApp:
    """The provider contract's HTTP endpoint: set the Worker's PROVIDER_URL to its URL."""
    backend = _backend()
    return ProviderApp(backend, os.environ["PROVIDER_SECRET"].encode())


@app.local_entrypoint()
def publish_sandbox_image() -> None:
    """Builds the sandbox image (supervisor from this checkout, OpenCode) and publishes its id to the provider."""
    sb = modal.Sandbox.create(app=app, image=sandbox_image, timeout=600, block_network=True)
    try:
        check = sb.exec("sh", "-c", "command -v nightshift-supervisor git curl && test -x $NIGHTSHIFT_OPENCODE_BIN")
        print(check.stdout.read())
        if check.wait() != 0:
            raise SystemExit(f"the sandbox image is incomplete: {check.stderr.read()}")
    finally:
        sb.terminate()
    state.put(BASE_IMAGE_KEY, {"id": sandbox_image.object_id})
    print(f"published sandbox image {sandbox_image.object_id}")
