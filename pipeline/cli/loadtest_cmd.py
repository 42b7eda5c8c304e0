import argparse
import os

from pipeline.cli.common import add_glue_dir, print_json


def add_parser(sub):
    p = sub.add_parser(
        "loadtest", help="load-test an inference endpoint with Locust (headless, in a subprocess)",
        description="Speaks bertforge's /predict, TEI, the Open Inference Protocol v2, or any JSON endpoint "
                    "through a request template; every answer is parsed (a malformed one is a failure). "
                    "Arguments after `--` go to Locust as they are, e.g. `-- --master --expect-workers 4` "
                    "for a distributed run (start workers with `locust -f serving/locustfile.py --worker "
                    "--master-host HOST`, with serving/loadtest_protocols.py beside it; answers are then "
                    "checked on the workers only).")
    p.add_argument("--host", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=10, help="concurrent users (sweep: of the closed-loop estimate)")
    p.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    p.add_argument("--duration", default="60s", help="run time: seconds or 30s, 2m, 1h30m (sweep: of the estimate)")
    p.add_argument("--out", default="loadtest", help="folder for Locust's CSV stats and summary.json / sweep.json")
    p.add_argument("--mode", choices=["closed", "fixed-rate", "sweep"], default="closed",
                   help="closed: each user waits for its answer; fixed-rate: --rate requests/s, open loop; "
                        "sweep: a closed-loop estimate, then fixed-rate steps at --steps of it, and the knee")
    p.add_argument("--rate", type=float, default=None, help="requests per second in total (fixed-rate mode)")
    p.add_argument("--task", default="sst2", help="GLUE task whose texts make the load")
    add_glue_dir(p)
    p.add_argument("--data-file", default=None, help="a TSV in the task's layout instead of the GLUE split")
    p.add_argument("--split", default=None, help="default: the task's dev split")
    p.add_argument("--batch", type=int, default=1, help="inputs per request")
    p.add_argument("--api-key", default=os.environ.get("BERTFORGE_API_KEY"))

    w = p.add_argument_group("protocol")
    w.add_argument("--protocol", choices=["bertforge", "tei", "oip", "template"], default="bertforge")
    w.add_argument("--path", default=None, help="request path (default: /predict; oip: /v2/models/NAME/infer)")
    w.add_argument("--header", action="append", default=[], metavar="K:V", help="extra request header (repeatable)")
    w.add_argument("--request-template", default=None, metavar="FILE",
                   help="template protocol: a JSON body with {{text}}, {{text_pair}} or {{texts}} placeholders")
    w.add_argument("--label-field", default=None,
                   help="template protocol: where the labels are in the answer, e.g. '$[0].label', "
                        "'outputs[0].data[*]', 'predictions[*].label' (names, [n], [*], ['key'])")
    w.add_argument("--model-name", default=None, help="oip: the model's name in /v2/models/NAME")
    w.add_argument("--input-name", action="append", default=None,
                   help="oip: input tensor name (twice for text pairs); default: read from /v2/models/NAME")
    w.add_argument("--output-name", default=None, help="oip: output tensor (default: the BYTES labels)")
    w.add_argument("--labels", default=None, help="class names by id, comma-separated (default: the task's)")
    w.add_argument("--ready-path", default=None, help="GET this until 200 before loading (default per protocol)")

    c = p.add_argument_group("answers")
    c.add_argument("--check-labels", action="store_true",
                   help="compare the labels served with the task's gold labels (and, for a bertforge artifact, "
                        "with its offline predictions); fail on a mismatch")
    c.add_argument("--model", default=None,
                   help="the artifact folder behind the endpoint: its offline answers and dev score "
                        "(default for --protocol bertforge: the folder the server's /info names, if it is here)")
    c.add_argument("--expected-accuracy", type=float, default=None,
                   help="fail when the served accuracy is below this by more than its sampling error")

    s = p.add_argument_group("sweep")
    s.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency objective for the knee")
    s.add_argument("--steps", default="0.1,0.25,0.5,0.75,1,1.25,1.5",
                   help="offered rates as fractions of the closed-loop estimate")
    s.add_argument("--step-duration", default="20s")
    s.add_argument("--step-users", type=int, default=4, help="open-loop users sharing each step's rate")
    s.add_argument("--name", default=None, help="the endpoint's name in reports (default: the host)")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="-- then arguments for Locust")
    p.set_defaults(func=run)


def run(args):
    from pipeline.errors import BertforgeError
    from serving.loadtest import load_examples, make_endpoint, prepare_check, run_loadtest, run_sweep

    extra = args.locust_args[1:] if args.locust_args[:1] == ["--"] else args.locust_args
    endpoint = make_endpoint(args.protocol, args.path, args.header, args.request_template, args.label_field,
                             args.model_name, args.input_name, args.output_name,
                             args.labels.split(",") if args.labels else None, args.ready_path)
    rows = load_examples(args.task, args.glue_dir, args.data_file, args.split)
    check = None
    if args.check_labels:
        check = prepare_check(args.host, args.task, rows, endpoint, args.model, args.expected_accuracy, args.api_key)
    common = dict(task=args.task, batch=args.batch, api_key=args.api_key, locust_args=extra, endpoint=endpoint,
                  label_check=check, rows=rows)
    if args.mode == "sweep":
        try:
            fractions = [float(f) for f in args.steps.split(",")]
        except ValueError:
            raise BertforgeError(f"--steps {args.steps!r}: comma-separated fractions, e.g. 0.25,0.5,1") from None
        summary = run_sweep(args.host, args.out, args.slo_ms, fractions, args.step_duration, args.users,
                            args.duration, args.step_users, args.name, **common)
        print_json(summary)
        return 0 if summary.get("labels_ok", True) else 1
    summary = run_loadtest(args.host, users=args.users, spawn_rate=args.spawn_rate, duration=args.duration,
                           out_dir=args.out, mode=args.mode, rate=args.rate, **common)
    print_json({k: v for k, v in summary.items() if k != "command"})
    return 1 if summary["failures"] or not summary.get("labels", {}).get("ok", True) else 0
