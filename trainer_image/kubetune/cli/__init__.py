"""`kubetune`: run a FineTuneJob on this machine, check and plan it, chat with the result,
and look at jobs on a cluster.

    kubetune validate JOB.yaml [--cluster]
    kubetune plan JOB.yaml [--gpu-memory 80Gi] [--model-config NAME|PATH] [--json]
    kubetune run JOB.yaml [--nproc N] [--embedded-s3] [--no-serve] [--questions FILE] ...
    kubetune chat URL|MODEL-URI
    kubetune list|status|logs ...      (cluster, over kubeconfig)

Each subcommand lives in its own module and is imported only when used, so `validate`
and `plan` start without torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune language models from one FineTuneJob file, locally or on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a job file (schema and deeper checks, same messages as the operator)")
    p.add_argument("job", help="FineTuneJob YAML file")
    p.add_argument("--cluster", action="store_true", help="also apply the checks the operator makes for cluster runs")

    p = sub.add_parser("plan", help="estimate GPU and host memory of a job")
    p.add_argument("job", help="FineTuneJob YAML file")
    p.add_argument("--gpu-memory", help="GPU memory to check against, e.g. 80Gi, 48GB, 24G (exit code 3 when it does not fit)")
    p.add_argument("--model-config", help="a shipped config name (see --list-configs) or a config.json path, instead of the job's model")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")

    p = sub.add_parser("run", help="run a job on this machine: train, merge, serve")
    p.add_argument("job", help="FineTuneJob YAML file; relative paths are relative to its folder")
    p.add_argument("--nproc", type=int, help="training processes (default: distributed.nodes x gpusPerNode, capped to this machine)")
    p.add_argument("--embedded-s3", action="store_true", help="start a local SeaweedFS S3 server for the job's s3:// locations (data kept in runs/NAME/s3)")
    p.add_argument("--no-serve", action="store_true", help="stop after training and merge even if serving is enabled")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running after the questions until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="port of the local server (default: a free one)")
    p.add_argument("--questions", help="JSON Lines file of questions to ask the served model: {question, expect: [..], kind}")
    p.add_argument("--compare-base", action="store_true", help="ask the questions to the base model too, to see what training changed")
    p.add_argument("--verbose", "-v", action="store_true", help="show the trainer's log lines")

    p = sub.add_parser("chat", help="chat with a served model (URL) or a model location")
    p.add_argument("target", help="http(s)://HOST:PORT of a kubetune-serve/OpenAI endpoint, or a model location (dir, s3://, file://)")
    p.add_argument("--base-model", help="base model location when TARGET is an adapter")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-history", action="store_true", help="send each question alone")
    p.add_argument("--max-tokens", type=int, help="longest answer")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--token", help="bearer token (default: env KUBETUNE_SERVE_TOKEN)")

    for name, text in (("list", "list FineTuneJobs"), ("status", "show one FineTuneJob"), ("logs", "print a job's pod logs")):
        p = sub.add_parser(name, help=f"{text} (cluster, via kubeconfig)")
        if name != "list":
            p.add_argument("name", help="FineTuneJob name")
        p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context")
        if name == "list":
            p.add_argument("-A", "--all-namespaces", action="store_true", help="list jobs in every namespace")
        if name == "logs":
            which = p.add_mutually_exclusive_group()
            which.add_argument("--worker", type=int, default=0, help="worker index (default 0, the one that logs progress)")
            which.add_argument("--merge", action="store_true", help="the merge pod's log")
            which.add_argument("--serve", action="store_true", help="a serving pod's log")
            p.add_argument("--tail", type=int, help="only the last N lines")
            p.add_argument("-f", "--follow", action="store_true", help="stream new lines")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("validate", "plan"):
        from . import check

        code = check.validate_command(args) if args.command == "validate" else check.plan_command(args)
    elif args.command == "run":
        from . import run

        code = run.run_command(args)
    elif args.command == "chat":
        from . import chat

        code = chat.chat_command(args)
    else:
        from . import cluster

        code = cluster.cluster_command(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
