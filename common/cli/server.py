"""`fedscan server ...`: what the coordinator runs: certificates, the SuperLink, site registration."""

from __future__ import annotations

from pathlib import Path

import typer

from fedscan.common.cli.root import app, out_console, user_errors

server_app = typer.Typer(
    name="server",
    help="Commands the coordinator runs: certificates, the SuperLink, site registration.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(server_app, name="server")


@server_app.command("init")
def server_init(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder to create."),
    host: list[str] = typer.Option(
        ..., "--host", help="DNS name or IP sites use to reach the server (repeat)."
    ),
    port: int = typer.Option(9092, "--port", help="The SuperLink's port (the one port sites connect to)."),
    force: bool = typer.Option(
        False, "--force", help="Replace existing keys (sites then need the new ca.crt)."
    ),
) -> None:
    """Create the federation's CA and the SuperLink's TLS certificate (keys written 0600)."""
    with user_errors():
        from fedscan.server.coordinator import init_server

        p = init_server(dir, host, port=port, force=force)
        out_console.print(
            f"wrote the CA ({p['ca_crt']}) and the SuperLink certificate for {', '.join(host)} into {dir}"
        )
        out_console.print(f"give every site {p['ca_crt']}; keep {p['ca_key']} private (offline if you can)")


@server_app.command("start")
def server_start(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default: from server init)."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default 0.0.0.0)."),
) -> None:
    """Run the SuperLink: TLS, site authentication, persistent state, no runtime installs."""
    with user_errors():
        from fedscan.server.coordinator import start_server

        code = start_server(
            dir, host, port, on_line=lambda line: out_console.print(line, highlight=False, markup=False)
        )
        raise typer.Exit(code)


@server_app.command("add-site")
def server_add_site(
    public_key: Path = typer.Argument(..., help="The site's site.pub (from `fedscan site init`)."),
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    name: str = typer.Option(..., "--name", help="The site's name."),
) -> None:
    """Register a hospital's public key; only registered sites may connect."""
    with user_errors():
        from fedscan.server.coordinator import add_site

        entry = add_site(dir, name, public_key)
        out_console.print(f"registered site '{name}' (node {entry['node_id']}, key {entry['fingerprint']})")
        out_console.print("check the fingerprint with the site's IT out of band (phone, not the same e-mail)")


@server_app.command("remove-site")
def server_remove_site(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    name: str = typer.Option(..., "--name", help="The site to remove."),
) -> None:
    """Unregister a site: its key is refused from now on."""
    with user_errors():
        from fedscan.server.coordinator import remove_site

        remove_site(dir, name)
        out_console.print(f"removed site '{name}': its key is refused from now on")


@server_app.command("sites")
def server_sites(dir: Path = typer.Option(..., "--dir", help="The coordinator folder.")) -> None:
    """List the registered sites and whether they are online."""
    with user_errors():
        from rich.table import Table

        from fedscan.server.coordinator import list_sites

        rows = list_sites(dir)
        table = Table(title=f"{len(rows)} registered site(s)")
        for col in ("site", "status", "online since", "key fingerprint", "node id"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["status"], r["online_at"], r["fingerprint"], r["node_id"])
        out_console.print(table)
