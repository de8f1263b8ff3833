"""Try a multi-machine run on one machine: `python -m recipes.launch --workers 2 -- ARGS`.

Starts the processes a cluster of machines would run, each with the environment it would have
there, on free ports of one address (127.0.0.1 by default), and waits for them:

- `--recipe cifar` (default): `--workers` processes of `python -m recipes.cifar ARGS
  --strategy multiworker`, worker i with `TF_CONFIG` = {"cluster": {"worker": [every
  address]}, "task": {"type": "worker", "index": i}}. Worker 0 is the chief: it writes the
  outputs. TensorFlow's collectives make every worker wait for the others, so when one worker
  fails the others are stopped.
- `--recipe tune`: a chief (`KERASTUNER_TUNER_ID=chief`) serving KerasTuner's oracle on
  `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT`, started first, then `--workers` worker tuners
  `tuner0`, `tuner1`, ... running `python -m recipes.tune ARGS`. A worker that dies (killed, or
  crashed) is started again with its tuner id, up to `--restarts` times: the chief hands it
  back its unfinished trial. The chief writes the results.

Ctrl-C (or SIGTERM) is forwarded once to every process (each runs in its own process group, so
the terminal's Ctrl-C reaches the launcher only); processes still running `--grace` seconds
later are killed. Every line a process prints is prefixed with its name. The exit status is
the chief's (128 + N for a chief killed by signal N).

`--print` shows the commands and environments instead of running them: the per-machine
commands of a real cluster are the same with each machine's own address.
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from recipes import cli

PROG = "python -m recipes.launch"
RECIPES = ("cifar", "tune")
#: Exit statuses after which a tune worker is not started again: done, bad arguments (it
#: would fail the same way), interrupted.
NO_RESTART = (0, 2, 130)

EPILOG = """\
examples:
  python -m recipes.launch --workers 2 -- --norm sync_batch --epochs 2 --output runs/mw
  python -m recipes.launch --recipe tune --workers 2 -- --quick --output runs/tune/dist
  python -m recipes.launch --print --workers 2 -- --norm sync_batch   # show, don't run

exit status: the chief's (0 done, 2 bad arguments, 130 interrupted, 128+N killed by signal N).
"""


class Process:
    """One process of the cluster: a name, a command line and the environment it adds."""

    def __init__(self, name, argv, env):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.popen = None
        self.starts = 0

    def describe(self):
        """The shell command that starts this process (its environment, then the command)."""
        assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env.items())
        return f"{assignments} {shlex.join(self.argv)}"


def free_ports(count, host="127.0.0.1"):
    """`count` distinct ports that are free on `host` now (bound and released at once)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _strategy_of(args):
    """The value of `--strategy` in `args` (either spelling), or None."""
    for index, arg in enumerate(args):
        if arg == "--strategy" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--strategy="):
            return arg.split("=", 1)[1]
    return None


def cifar_processes(args, workers, host, ports, module="recipes.cifar"):
    """The worker processes of a multi-worker `recipes.cifar` run (worker 0 is the chief)."""
    if len(ports) != workers:
        raise ValueError(f"cifar_processes: {workers} workers need {workers} ports, got {ports}")
    args = list(args)
    if module == "recipes.cifar":
        strategy = _strategy_of(args)
        if strategy not in (None, "multiworker"):
            raise ValueError(f"the launcher runs --strategy multiworker; remove --strategy "
                             f"{strategy} from the recipe's arguments")
        if strategy is None:
            args += ["--strategy", "multiworker"]
    cluster = {"worker": [f"{host}:{port}" for port in ports]}
    return [Process(f"worker {index}", [sys.executable, "-m", module, *args],
                    {"TF_CONFIG": json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": index}})})
            for index in range(workers)]


def tune_processes(args, workers, host, port, module="recipes.tune"):
    """The chief and worker tuners of a distributed `recipes.tune` search (chief first)."""
    common = {"KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": str(port)}
    names = ["chief"] + [f"tuner{index}" for index in range(workers)]
    return [Process(name, [sys.executable, "-m", module, *args],
                    {**common, "KERASTUNER_TUNER_ID": name}) for name in names]


def exit_status(returncode):
    """A shell-style exit status: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    """Runs `processes` as one cluster; see the module docstring.

    Args:
        processes: `Process` objects; the first is the chief.
        restarts: Times each non-chief process is started again after dying abnormally
            (status not in `NO_RESTART`).
        stop_on_failure: Stop everything when any process fails (multi-worker training,
            whose workers would otherwise wait for the failed one).
        wait_for_port: `(host, port)` the chief listens on before the others start, or None
            to start all at once.
        grace: Seconds between the forwarded Ctrl-C / stop and SIGKILL.
        start_timeout: Seconds to wait for the chief's port.
        output: Where the prefixed lines go (a text stream).
    """

    def __init__(self, processes, restarts=0, stop_on_failure=False, wait_for_port=None,
                 grace=30.0, start_timeout=600.0, output=None):
        self.processes = list(processes)
        self.restarts = restarts
        self.stop_on_failure = stop_on_failure
        self.wait_for_port = wait_for_port
        self.grace = grace
        self.start_timeout = start_timeout
        self.output = output or sys.stdout
        self._lock = threading.Lock()
        self._threads = []
        self._stopping_since = None

    # ---------------------------------------------------------------------------- output
    def say(self, name, line):
        with self._lock:
            self.output.write(f"[{name}] {line}\n")
            self.output.flush()

    def _pump(self, process, stream):
        for raw in iter(stream.readline, b""):
            self.say(process.name, raw.decode("utf-8", "replace").rstrip("\r\n"))
        stream.close()

    # ---------------------------------------------------------------------------- processes
    def _start(self, process):
        process.starts += 1
        env = {**os.environ, **process.env}
        # Its own process group: the terminal's Ctrl-C reaches the launcher only, which then
        # forwards it exactly once.
        process.popen = subprocess.Popen(process.argv, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        thread = threading.Thread(target=self._pump, args=(process, process.popen.stdout),
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _signal(self, process, signum):
        if process.popen is not None and process.popen.poll() is None:
            try:
                os.killpg(process.popen.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, signum=signal.SIGINT):
        """Sends `signum` to every running process (once); SIGKILL follows after `grace`."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            for process in self.processes:
                self._signal(process, signum)

    def kill_all(self):
        for process in self.processes:
            self._signal(process, signal.SIGKILL)
        for process in self.processes:
            if process.popen is not None:
                process.popen.wait()

    def _wait_for_chief(self):
        """Waits until the chief listens on its port; False if it ended (or we stopped)."""
        host, port = self.wait_for_port
        deadline = time.monotonic() + self.start_timeout
        chief = self.processes[0].popen
        while time.monotonic() < deadline:
            if chief.poll() is not None or self._stopping_since is not None:
                return False
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.2)
        self.say("launcher", f"the chief did not listen on {host}:{port} within "
                             f"{self.start_timeout:g} s; stopping")
        self.stop(signal.SIGTERM)
        return False

    def run(self):
        """Starts the processes and waits for them; returns the chief's exit status."""
        handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, lambda s, _frame: self.stop(s))
        try:
            return self._run()
        finally:
            self.kill_all()  # nothing outlives the launcher, whatever happened
            for thread in self._threads:
                thread.join(timeout=5)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _run(self):
        chief, others = self.processes[0], self.processes[1:]
        self._start(chief)
        if self.wait_for_port is not None and not self._wait_for_chief():
            others = []
        for process in others:
            self._start(process)
        started = [chief, *others]
        while True:
            time.sleep(0.1)
            if (self._stopping_since is not None
                    and time.monotonic() - self._stopping_since > self.grace):
                running = [p.name for p in started if p.popen.poll() is None]
                if running:
                    self.say("launcher", f"still running {self.grace:g} s after the stop: "
                                         f"killing {', '.join(running)}")
                    self.kill_all()
            for process in started:
                code = process.popen.poll()
                if code is None or getattr(process, "reported", False):
                    continue
                process.reported = True
                if code != 0:
                    self.say("launcher", f"{process.name} ended with status "
                                         f"{exit_status(code)}")
                if process is chief:
                    continue
                if (code not in NO_RESTART and self._stopping_since is None
                        and process.starts <= self.restarts):
                    self.say("launcher", f"starting {process.name} again "
                                         f"({process.starts}/{self.restarts} restarts)")
                    process.reported = False
                    self._start(process)
                elif code != 0 and self.stop_on_failure:
                    self.say("launcher", "a worker failed: stopping the others")
                    self.stop(signal.SIGTERM)
            if chief.popen.poll() is not None:
                if all(p.popen.poll() is not None for p in started):
                    return exit_status(chief.popen.returncode)
                if self._stopping_since is None:
                    if chief.popen.returncode == 0:
                        # Done: the others end by themselves (a search's chief has told its
                        # workers to stop), or are killed after the grace period.
                        self._stopping_since = time.monotonic()
                    else:  # they would wait for the chief in vain
                        self.stop(signal.SIGTERM)


def build_parser():
    parser = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n"
                        + "\n\n".join(__doc__.split("\n\n")[1:3]),
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=RECIPES, default="cifar",
                        help="cifar: multi-worker training (default); tune: distributed search")
    parser.add_argument("--workers", type=cli.positive_int, default=2, metavar="N",
                        help="worker processes (tune: besides the chief). Default: 2")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address every process listens on and connects to. Default: "
                             "127.0.0.1")
    parser.add_argument("--restarts", type=cli.non_negative_int, default=2, metavar="N",
                        help="tune: times a dead worker is started again. Default: 2")
    parser.add_argument("--grace", type=cli.positive_float, default=30.0, metavar="SECONDS",
                        help="after Ctrl-C or a failure, kill what still runs this much later. "
                             "Default: 30")
    parser.add_argument("--module", default=None,
                        help="run this Python module instead of recipes.<recipe>, with the "
                             "same environment (your own script reading TF_CONFIG or "
                             "KERASTUNER_*)")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print each process's environment and command, run nothing")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="after --: the recipe's own arguments")
    return parser


def processes_for(options):
    """The `Process` list and the chief's `(host, port)` to wait for (tune) or None."""
    args = list(options.args)
    if args[:1] == ["--"]:
        args = args[1:]
    module = options.module or f"recipes.{options.recipe}"
    if options.recipe == "cifar":
        ports = free_ports(options.workers, options.host)
        return cifar_processes(args, options.workers, options.host, ports, module), None
    (port,) = free_ports(1, options.host)
    return tune_processes(args, options.workers, options.host, port, module), (options.host,
                                                                               port)


def main(argv=None):
    """Runs the command line; returns the exit status."""
    options = build_parser().parse_args(argv)
    try:
        processes, chief_port = processes_for(options)
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if options.print_only:
        for process in processes:
            print(f"# {process.name}\n{process.describe()}")
        return 0
    launcher = Launcher(processes, restarts=options.restarts if options.recipe == "tune" else 0,
                        stop_on_failure=options.recipe == "cifar", wait_for_port=chief_port,
                        grace=options.grace)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
