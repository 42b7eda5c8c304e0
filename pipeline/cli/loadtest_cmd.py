import argparse
import os

from pipeline.cli.common import add_glue_dir, print_json


def add_parser(sub):
    p = sub.add_parser(
        "loadtest", help="load-test a running `bertforge serve` with Locust (headless, in a subprocess)",
        description="Arguments after `--` go to Locust as they are, e.g. `-- --master --expect-workers 4` "
                    "for a distributed run (start workers with `locust -f serving/locustfile.py --worker "
                    "--master-host HOST`).")
    p.add_argument("--host", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=10, help="concurrent users")
    p.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    p.add_argument("--duration", default="60s", help="run time: seconds or 30s, 2m, 1h30m")
    p.add_argument("--out", default="loadtest", help="folder for Locust's CSV stats and summary.json")
    p.add_argument("--mode", choices=["closed", "fixed-rate"], default="closed",
                   help="closed: each user waits for its answer; fixed-rate: --rate requests/s, open loop")
    p.add_argument("--rate", type=float, default=None, help="requests per second in total (fixed-rate mode)")
    p.add_argument("--task", default="sst2", help="GLUE task whose texts make the load")
    add_glue_dir(p)
    p.add_argument("--data-file", default=None, help="a TSV in the task's layout instead of the GLUE split")
    p.add_argument("--split", default=None, help="default: the task's dev split")
    p.add_argument("--batch", type=int, default=1, help="inputs per request")
    p.add_argument("--api-key", default=os.environ.get("BERTFORGE_API_KEY"))
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="-- then arguments for Locust")
    p.set_defaults(func=run)


def run(args):
    from serving.loadtest import run_loadtest

    extra = args.locust_args[1:] if args.locust_args[:1] == ["--"] else args.locust_args
    summary = run_loadtest(args.host, users=args.users, spawn_rate=args.spawn_rate, duration=args.duration,
                           out_dir=args.out, mode=args.mode, rate=args.rate, task=args.task, glue_dir=args.glue_dir,
                           data_file=args.data_file, split=args.split, batch=args.batch, api_key=args.api_key,
                           locust_args=extra)
    print_json({k: v for k, v in summary.items() if k != "command"})
    return 1 if summary["failures"] else 0
