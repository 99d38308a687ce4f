"""End-to-end harness: a real ComfyUI server with this extension installed, driven over HTTP and a websocket.

The tests run under the repository's Python; the server runs under ComfyUI's own venv ($COMFYUI_HOME/venv, built by
shared/comfyui-host/setup.sh). The event stream is read with websocket-client (the `test` extra): a maintained
client, so framing, pings and closes are not ours to get right.

    server = ComfyUIServer(home, workdir).start()
    prompt_id = server.queue(api_prompt)            # POST /prompt; raises PromptRejected on validation errors
    entry, events = server.wait(prompt_id, 60)      # history entry + this prompt's websocket events
    server.interrupt(); server.object_info("SaveImage"); server.group_processes("worker_main.py"); server.stop()

The extension is installed as a real clone would be: a symlink
$COMFYUI_HOME/ComfyUI/custom_nodes/comfyui-parallel-diffusion pointing at this repository. Everything the server
writes (output, input, temp, user, database) goes to `workdir`, and `diffusers` models are looked up first in
`workdir/models/diffusers` (through --extra-model-paths-config). The same file adds `workdir/custom_nodes`, where
the test-only nodes (TEST_NODES: tests/comfyui_test_nodes.py) are linked.

`workflow_to_api` converts a UI-format workflow (what the frontend saves, and what example_workflows/ holds) into
the API format that POST /prompt takes; ComfyUI has no server-side converter. It mirrors what the frontend saves, so
ComfyUIServer.workflow_to_api refuses a host whose comfyui_frontend_package is outside FRONTEND_CHECKED.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE_KINDS = ("diffusion_models", "text_encoders", "vae", "loras")  # ComfyUI's folders of single model files
NODE_FOLDER_NAME = "comfyui-parallel-diffusion"  # the name a `git clone` of the repository would give
# Test-only custom nodes, linked into a custom_nodes folder of the server's workdir (never the host's own folder).
TEST_NODES = (Path(__file__).resolve().with_name("comfyui_test_nodes.py"),)
SKIP_REASON = ("no ComfyUI host: set COMFYUI_HOME to a folder built by shared/comfyui-host/setup.sh "
               "(holding ComfyUI/main.py and venv/bin/python)")


class PromptRejected(RuntimeError):
    """POST /prompt refused the prompt, or accepted it with node_errors (some outputs would not run)."""

    def __init__(self, message: str, response: dict):
        super().__init__(message)
        self.response = response


def find_comfyui_home() -> Path | None:
    """$COMFYUI_HOME if it holds a built host, else None."""
    home = os.environ.get("COMFYUI_HOME")
    if not home:
        return None
    home = Path(home).expanduser().resolve()
    if (home / "ComfyUI" / "main.py").is_file() and (home / "venv" / "bin" / "python").exists():
        return home
    return None


def install_extension(home: Path, source: Path = REPO_ROOT, name: str = NODE_FOLDER_NAME) -> Path:
    """Symlink `source` into the host's custom_nodes/ as `name`; an existing link elsewhere is re-pointed,
    a real folder of that name is left alone (error)."""
    link = Path(home) / "ComfyUI" / "custom_nodes" / name
    source = Path(source).resolve()
    if link.is_symlink():
        if Path(os.readlink(link)).resolve() == source:
            return link
        link.unlink()
    elif link.exists():
        raise RuntimeError(f"{link} exists and is not a symlink: remove it or pick another name")
    link.symlink_to(source, target_is_directory=True)
    return link


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------

class ComfyUIServer:
    """One ComfyUI server process on a free loopback port, isolated in `workdir`."""

    def __init__(self, home: Path | str, workdir: Path | str, *, extension: Path | str | None = REPO_ROOT,
                 node_folder_name: str = NODE_FOLDER_NAME, cpu: bool | None = None, extra_args: tuple = (),
                 env: Mapping[str, str] | None = None, startup_timeout: float = 120.0,
                 test_nodes: tuple = TEST_NODES):
        self.home = Path(home)
        self.comfy_dir = self.home / "ComfyUI"
        self.python = self.home / "venv" / "bin" / "python"
        self.workdir = Path(workdir)
        self.extension = Path(extension) if extension is not None else None
        self.node_folder_name = node_folder_name
        # --cpu unless the machine has an NVIDIA driver; COMFYUI_CPU=1/0 forces it either way.
        if cpu is None:
            forced = os.environ.get("COMFYUI_CPU")
            cpu = forced == "1" if forced in ("0", "1") else shutil.which("nvidia-smi") is None
        self.cpu = cpu
        self.extra_args = tuple(extra_args) + tuple(shlex.split(os.environ.get("COMFYUI_EXTRA_ARGS", "")))
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.test_nodes = tuple(Path(p) for p in test_nodes)

        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.user_dir = self.workdir / "user"
        self.temp_parent = self.workdir  # ComfyUI appends "temp"
        self.temp_dir = self.workdir / "temp"
        self.models_dir = self.workdir / "models"
        self.diffusers_dir = self.models_dir / "diffusers"
        self.custom_nodes_dir = self.workdir / "custom_nodes"
        self.log_path = self.workdir / "comfyui.log"

        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.node_link: Path | None = None
        self.startup_seconds: float | None = None
        self.leftover_pids: list[int] = []  # processes of the server's group still alive after it exited
        self._ws = None  # a websocket.WebSocket while connected
        self._ws_stop = threading.Event()
        self._ws_thread: threading.Thread | None = None
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._ws_open = False
        self._info_cache: dict[str, dict | None] = {}
        self._frontend_checked = False

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [str(self.python), "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
                "--temp-directory", str(self.temp_parent), "--user-directory", str(self.user_dir),
                "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
                "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}", "--disable-auto-launch"]
        if self.cpu:
            args.append("--cpu")
        return args + list(self.extra_args)

    def start(self) -> "ComfyUIServer":
        for d in (self.output_dir, self.input_dir, self.user_dir, self.diffusers_dir,
                  *(self.models_dir / kind for kind in SPLIT_FILE_KINDS)):
            d.mkdir(parents=True, exist_ok=True)
        self.custom_nodes_dir.mkdir(parents=True, exist_ok=True)
        for node_file in self.test_nodes:
            link = self.custom_nodes_dir / node_file.name
            if not link.is_symlink():
                link.symlink_to(node_file)
        # json strings are valid YAML scalars; is_default puts these folders first (and makes them the save target).
        (self.workdir / "extra_model_paths.yaml").write_text(
            "parallel_diffusion_tests:\n"
            f"  base_path: {json.dumps(str(self.models_dir))}\n"
            "  is_default: true\n"
            "  diffusers: diffusers\n"
            "  diffusion_models: diffusion_models\n"
            "  text_encoders: text_encoders\n"
            "  vae: vae\n"
            "  loras: loras\n"
            f"  custom_nodes: {json.dumps(str(self.custom_nodes_dir))}\n")  # absolute, so not under base_path
        if self.extension is not None:
            self.node_link = install_extension(self.home, self.extension, self.node_folder_name)
        self.port = free_loopback_port()
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONHOME", None)
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        # Its own session: the group id is the server's pid, so its workers can be found (and reaped) at stop().
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            deadline = t0 + self.startup_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
                try:
                    self.get("/system_stats", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer in {self.startup_timeout} s:\n{self.log_tail()}")
                time.sleep(0.2)
            self.startup_seconds = time.monotonic() - t0
            self._connect_ws()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect_ws(self) -> None:
        # imported here: the tests that never start a server need only the runtime's dependencies (the GPU
        # machines' checks run without the test extra)
        import websocket  # websocket-client

        self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=10)
        self._ws.settimeout(0.5)  # how often the reader looks at _ws_stop
        self._ws_stop.clear()
        self._ws_open = True
        self._ws_thread = threading.Thread(target=self._read_ws, name="comfyui-ws", daemon=True)
        self._ws_thread.start()

    def _read_ws(self) -> None:
        import websocket

        ws = self._ws
        try:
            while not self._ws_stop.is_set():
                try:
                    opcode, payload = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    continue
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    try:
                        event = json.loads(payload)
                    except ValueError:
                        continue
                    event = {"type": event.get("type"), "data": event.get("data"), "time": time.time()}
                else:  # previews: 4-byte event type + payload
                    event = {"type": "binary", "data": {"size": len(payload)}, "time": time.time()}
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        except (websocket.WebSocketException, OSError, ValueError):  # closed by the server, or a bad frame
            pass
        finally:
            try:
                ws.close(timeout=2)  # here, not in stop(): close() reads the server's reply, and this is the reader
            except (websocket.WebSocketException, OSError):
                pass
            ws.shutdown()  # close() leaves the socket open once the server has closed first
            with self._cond:
                self._ws_open = False
                self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """TERM the server, KILL it after `timeout`; then KILL whatever of its process group is left (workers that
        did not follow their parent), recording their pids in `leftover_pids`. Returns the server's exit code."""
        if self._ws is not None:
            self._ws_stop.set()
            if self._ws_thread is not None:
                self._ws_thread.join(5)
            self._ws = None
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        left = _group_members(pgid)
        if left:
            time.sleep(1.0)  # let workers notice their parent is gone
            left = _group_members(pgid)
        self.leftover_pids = left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._ws_thread is not None:
            self._ws_thread.join(5)
        return self.proc.returncode

    def __enter__(self) -> "ComfyUIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def group_processes(self, command_contains: str = "") -> dict[int, str]:
        """{pid: command line} of the server's child processes (its process group, the server itself left out)
        whose command line contains `command_contains`: e.g. the extension's worker processes."""
        if not self.alive():
            return {}
        out = {}
        for pid in _group_members(self.proc.pid):
            if pid == self.proc.pid:
                continue
            try:
                cmdline = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if command_contains in cmdline:
                out[pid] = cmdline.strip()
        return out

    # -- logs ---------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def custom_node_imports(self) -> dict[str, tuple[float, bool]]:
        """The server log's "Import times for custom nodes" list: module path -> (seconds, imported)."""
        out = {}
        for m in re.finditer(r"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?: (.+?)\s*$", self.log_text(), re.M):
            out[m.group(3)] = (float(m.group(1)), m.group(2) is None)
        return out

    def extension_import(self) -> tuple[float, bool] | None:
        """(seconds, imported) of this extension's folder, None when the log does not list it."""
        target = str(self.comfy_dir / "custom_nodes" / self.node_folder_name)
        return self.custom_node_imports().get(target)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        return self._request("POST", path, {} if payload is None else payload, timeout=timeout)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, name: str | None = None) -> dict | None:
        """GET /object_info/<name>: that node's definition, None for an unknown node; without a name, all nodes."""
        if name is None:
            return self.get("/object_info")
        return self.get("/object_info/" + urllib.parse.quote(name, safe="")).get(name)

    def queue(self, prompt: dict, *, extra_data: dict | None = None, check: bool = True) -> str:
        """POST /prompt (API format) under this harness's client id; returns the prompt id. Raises PromptRejected
        when the server refuses it, or (check=True) when it answers with node_errors."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            resp = self.post("/prompt", body)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                resp = json.loads(text)
            except ValueError:
                resp = {"error": text}
            raise PromptRejected(f"POST /prompt refused ({e.code}): {json.dumps(resp)[:4000]}", resp) from None
        if check and resp.get("node_errors"):
            raise PromptRejected(f"node_errors: {json.dumps(resp['node_errors'])[:4000]}", resp)
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get("/history/" + prompt_id).get(prompt_id)

    def events(self, prompt_id: str | None = None) -> list[dict]:
        """Websocket events received so far, only those of `prompt_id` if given."""
        with self._cond:
            evs = list(self._events)
        if prompt_id is None:
            return evs
        return [e for e in evs if isinstance(e["data"], dict) and e["data"].get("prompt_id") == prompt_id]

    def wait(self, prompt_id: str, timeout: float = 120.0, *, interrupt_on_timeout: bool = True
             ) -> tuple[dict, list[dict]]:
        """Wait until the prompt has finished (success, error or interrupted); returns its /history entry and its
        websocket events ({"type", "data", "time"}). On timeout it interrupts the prompt and raises TimeoutError."""
        deadline = time.monotonic() + timeout
        terminal = ("execution_success", "execution_error", "execution_interrupted")
        next_poll = 0.0
        while True:
            evs = self.events(prompt_id)
            done = any(e["type"] in terminal or (e["type"] == "executing" and e["data"].get("node") is None)
                       for e in evs)
            now = time.monotonic()
            if done or now >= next_poll:  # history is written just after execution_success: poll for it
                entry = self.history(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None:
                    if entry["status"].get("status_str") in ("success", "error"):
                        return entry, self.events(prompt_id)
                next_poll = now + (0.1 if done else 1.0)
            if not self.alive():
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}) while running {prompt_id}:\n"
                                   f"{self.log_tail()}")
            if now >= deadline:
                if interrupt_on_timeout:
                    self.interrupt(prompt_id)
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s; events: "
                                   f"{[e['type'] for e in evs]}\n{self.log_tail()}")
            with self._cond:
                self._cond.wait(0.1 if done else 0.5)

    def run(self, prompt: dict, timeout: float = 120.0, **queue_kwargs) -> tuple[dict, list[dict]]:
        """queue() then wait()."""
        return self.wait(self.queue(prompt, **queue_kwargs), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: the running prompt (only if it is `prompt_id`, when given)."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """POST /free: the prompt worker calls unload_all_models() (and, with free_memory, drops its node cache)
        once it is idle."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of the files a history entry's outputs name (SaveImage, PreviewImage, ...)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        files.append(roots.get(item.get("type"), self.output_dir) / item.get("subfolder", "")
                                     / item["filename"])
        return files

    def workflow_to_api(self, workflow: dict, strict: bool = True) -> dict:
        """workflow_to_api() with this server's /object_info (fetched once per node type), once check_frontend()
        has accepted the host's frontend."""
        if not self._frontend_checked:
            check_frontend(self.home)
            self._frontend_checked = True
        def info(name: str) -> dict | None:
            if name not in self._info_cache:
                self._info_cache[name] = self.object_info(name)
            return self._info_cache[name]
        return workflow_to_api(workflow, info, strict=strict)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


# ---------------------------------------------------------------------------------------------------------------
# UI workflow -> API prompt

# The frontend releases [low, high) whose saved workflows this converter was checked against: another one may lay
# out widgets_values differently, and a wrong mapping would still be a valid prompt, so the server refuses it.
FRONTEND_PACKAGE = "comfyui_frontend_package"
FRONTEND_CHECKED = ((1, 35), (1, 36))


def frontend_version(home: Path | str) -> str | None:
    """The version of the host venv's comfyui_frontend_package (what its ComfyUI serves), None if it has none."""
    sites = sorted(str(p) for p in (Path(home) / "venv" / "lib").glob("python3*/site-packages"))
    dists = list(importlib.metadata.distributions(name=FRONTEND_PACKAGE, path=sites))
    return dists[0].version if dists else None


def check_frontend(home: Path | str) -> str:
    """frontend_version(home), or RuntimeError when it is missing or outside FRONTEND_CHECKED."""
    version = frontend_version(home)
    m = re.match(r"(\d+)\.(\d+)", version or "")
    low, high = FRONTEND_CHECKED
    if m is None or not low <= (int(m[1]), int(m[2])) < high:
        checked = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        raise RuntimeError(
            f"{FRONTEND_PACKAGE} {version or 'is not installed'} in {home}/venv: workflow_to_api was checked against "
            f"{checked} only; check its conversion against the installed frontend and widen "
            f"FRONTEND_CHECKED (tests/comfyui_server.py), or queue API-format prompts")
    return version


# Input types the frontend draws as widgets (FRONTEND_CHECKED), each holding one entry of widgets_values.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "COLOR", "TEXTAREA", "IMAGECOMPARE",
                "CHART", "GALLERIA"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
VIRTUAL_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}  # frontend-only: no class in the backend


def _spec(spec: Any) -> tuple[Any, dict]:
    if isinstance(spec, (list, tuple)):
        return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return spec, {}


def widget_slots(name: str, spec: Any) -> int:
    """How many widgets_values entries an input takes: 0 (a socket), 1, or 2 (a value plus the frontend's extra
    widget: the "control after generate" choice of a seed, or the upload button of LoadImage)."""
    typ, opts = _spec(spec)
    is_combo = isinstance(typ, (list, tuple)) or typ == "COMBO"
    if not (is_combo or typ in WIDGET_TYPES) or opts.get("forceInput"):
        return 0
    control = opts.get("control_after_generate")
    if control is None and typ == "INT":
        control = name in ("seed", "noise_seed")  # the frontend adds it to these even without the option
    extra = bool(control) and (typ in ("INT", "FLOAT") or is_combo)
    if is_combo and any(k.endswith("_upload") and v for k, v in opts.items()):
        extra = True  # image_upload / video_upload ...: a button widget, saved as one more value
    return 1 + int(extra)


def _links(workflow: dict) -> dict[int, tuple[int, int]]:
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):  # schema version 1
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            out[link[0]] = (link[1], link[2])
    return out


def _default(spec: Any) -> Any:
    typ, opts = _spec(spec)
    if "default" in opts:
        return opts["default"]
    options = typ if isinstance(typ, (list, tuple)) else opts.get("options")
    return options[0] if options else None


def workflow_to_api(workflow: dict, node_info: Mapping[str, Any] | Callable[[str], dict | None], *,
                    strict: bool = True) -> dict:
    """Convert a UI-format workflow to an API prompt {node_id: {"class_type", "inputs", "_meta"}}.

    node_info: a node type's /object_info entry (mapping, or callable returning None for unknown types).
    Widget values are matched to the widget inputs in input order (required, then optional), a seed-like input
    taking two entries; linked inputs become [source_id, output_index]. Muted nodes are left out, bypassed nodes are
    passed through (an input of the same type), Reroute nodes are followed, a PrimitiveNode's value is already in
    its target's widgets_values, notes are dropped. Subgraphs and group nodes are not handled (ValueError).
    strict: a node whose widgets_values count differs from its widget slots is an error (ValueError). Otherwise
    extra trailing values (display-only widgets some frontend extensions add) are ignored and missing trailing
    ones (inputs added since the workflow was saved) take the input's default, as the frontend would.
    """
    lookup = node_info if callable(node_info) else (lambda name: node_info.get(name))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)
    subgraphs = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs", [])}

    def input_link(node: dict, name: str | None = None, index: int | None = None) -> int | None:
        for i, inp in enumerate(node.get("inputs") or []):
            if (name is not None and inp.get("name") == name) or (index is not None and i == index):
                return inp.get("link")
        return None

    def resolve(link_id: int, seen: frozenset = frozenset()) -> list | None:
        """[source_id, slot] of the real node behind a link; None when nothing real feeds it."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        seen = seen | {link_id}
        origin_id, slot = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        kind = origin["type"]
        if kind == "Reroute":
            return resolve(input_link(origin, index=0), seen)
        if kind == "PrimitiveNode":
            return None  # its value is the target widget's value
        mode = origin.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:  # pass through an input of the output's type: same index first, then any
            out_type = ((origin.get("outputs") or [{}] * (slot + 1))[slot] or {}).get("type")
            inputs = origin.get("inputs") or []
            order = ([slot] if slot < len(inputs) else []) + [i for i in range(len(inputs)) if i != slot]
            for i in order:
                if inputs[i].get("type") == out_type and inputs[i].get("link") is not None:
                    return resolve(inputs[i]["link"], seen)
            return None
        return [str(origin_id), slot]

    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if kind in subgraphs:
            raise ValueError(f"node {node['id']}: subgraphs are not supported by this converter ({kind})")
        info = lookup(kind)
        if not info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r} (not in /object_info)")
        values = node.get("widgets_values")
        values = [] if values is None else values
        inputs: dict[str, Any] = {}
        used = 0
        order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
        for section in ("required", "optional"):
            specs = info.get("input", {}).get(section, {}) or {}
            for name in order.get(section, list(specs)):
                spec = specs.get(name)
                slots = widget_slots(name, spec)
                if slots:
                    if isinstance(values, dict):
                        if name in values:
                            inputs[name] = values[name]
                    elif used < len(values):
                        inputs[name] = values[used]
                    elif not strict:
                        inputs[name] = _default(spec)
                    used += slots
                src = resolve(input_link(node, name=name))
                if src is not None:
                    inputs[name] = src
        if strict and isinstance(values, list) and used != len(values):
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widgets_values for {used} widget slots "
                             f"of {order}: {values!r}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


def load_workflow(path: Path | str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# pytest: the session's server. Import `comfyui` into a test module (or a conftest.py) to use it.

try:
    import pytest
except ImportError:  # the harness also works without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def comfyui(tmp_path_factory):
        """A started ComfyUIServer with this extension; skips the test when no host is configured."""
        home = find_comfyui_home()
        if home is None:
            reason = SKIP_REASON + f" (COMFYUI_HOME={os.environ.get('COMFYUI_HOME')!r})"
            if os.environ.get("CI") == "true":  # CI must run these, never pass by skipping them
                pytest.fail(reason)
            pytest.skip(reason)
        server = ComfyUIServer(home, tmp_path_factory.mktemp("comfyui"))
        server.start()
        try:
            yield server
        finally:
            server.stop()
