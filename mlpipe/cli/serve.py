"""``mlpipe serve``: a registered model behind HTTP."""

from __future__ import annotations

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli


@cli.command(context_settings={"show_default": True})
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--token-env",
    metavar="NAME",
    help="Require 'Authorization: Bearer <token>', the token read from this variable.",
)
@click.option(
    "--max-bytes",
    default="512M",
    metavar="SIZE",
    help="Largest upload, in bytes or with K/M/G (powers of 1024).",
)
@click.option(
    "--range-factor",
    default=3.0,
    type=float,
    help="Refuse volumes whose spacing or shape is more than this many times outside the "
    "training data's range (0: no check).",
)
@click.option(
    "--concurrency",
    default=1,
    type=int,
    help="Inferences at once (each uses every CPU core; more helps on a GPU).",
)
@click.option("--max-queue", default=32, type=int, help="Requests that may wait; more get 503.")
@click.option(
    "--profile-file",
    type=click.Path(dir_okay=False),
    help="Where input profiles go [default: <cache>/serving/<model>/profiles.jsonl].",
)
@click.option("--max-profiles", default=10_000, type=int, help="Input profiles kept (newest).")
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
def serve(
    model_uri: str,
    host: str,
    port: int,
    token_env: str | None,
    max_bytes: str,
    range_factor: float,
    concurrency: int,
    max_queue: int,
    profile_file: str | None,
    max_profiles: int,
    tracking_uri: str | None,
) -> None:
    """Serve a registered seg3d model over HTTP, with a page to try it at /docs.

    MODEL_URI is models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH. The model
    loads once; uploads (.nii/.nii.gz) are checked (NIfTI, 3D, size, spacing and shape
    against the training data profile) and every input's profile is kept for `mlpipe drift`.

    \b
    Examples:
      mlpipe serve models:/seg3d@production
      API_TOKEN=s3cret mlpipe serve models:/seg3d/3 --host 0.0.0.0 --token-env API_TOKEN
      curl -F file=@ct.nii.gz -o mask.nii.gz http://127.0.0.1:8080/segment
    """
    from mlpipe.inference.inputs import parse_size
    from mlpipe.serve.listen import bind, run_server
    from mlpipe.serve.service import ServeOptions, prepare

    options = ServeOptions(
        model_uri=model_uri,
        host=host,
        port=port,
        token_env=token_env,
        max_bytes=parse_size(max_bytes),
        range_factor=range_factor,
        concurrency=concurrency,
        max_queue=max_queue,
        profile_file=profile_file,
        max_profiles=max_profiles,
        tracking_uri=tracking_uri,
    )
    options.check()
    sock = bind(host, port)
    try:
        state = prepare(options, echo=lambda msg: click.echo(msg, err=True))
    except BaseException:
        sock.close()
        raise
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    click.echo(f"Serving {state.source.label} on {state.device} at {url}", err=True)
    click.echo(f"  try it:   {url}/docs", err=True)
    click.echo(f"  profiles: {state.profile_file}", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not state.token:
        click.echo(
            "Warning: listening beyond this machine without --token-env: anyone who reaches "
            "it can use the model.",
            err=True,
        )
    run_server(state, sock)
