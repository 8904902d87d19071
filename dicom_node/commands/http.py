"""`dicom-node http ...`: credentials for the operations view (hashes go into `[http]` or its users_file)."""

from __future__ import annotations

import typer

from dicom_node.commands._common import fail

http_app = typer.Typer(help="Credentials for the web view, API and /metrics.", no_args_is_help=True)


@http_app.command("hash-password")
def hash_password(
    name: str = typer.Option(..., "--name", help="User name (no colon, no spaces)."),
    role: str = typer.Option("viewer", "--role", help="viewer, physicist or admin."),
    password: str = typer.Option(
        ..., prompt=True, hide_input=True, confirmation_prompt=True, help="Asked for when not given."
    ),
) -> None:
    """Print a [[http.users]] entry with the password's scrypt hash (the password itself is never stored)."""
    from dicom_node.http.auth import ROLES, hash_secret

    if role not in ROLES:
        raise fail(f"--role {role!r} is not one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise fail("the password must have at least 8 characters")
    typer.echo(f'[[http.users]]\nname = "{name}"\nrole = "{role}"\npassword_hash = "{hash_secret(password)}"')


@http_app.command("new-token")
def new_token(
    name: str = typer.Option(..., "--name", help="What uses the token, e.g. prometheus."),
    role: str = typer.Option("viewer", "--role", help="viewer, physicist or admin."),
) -> None:
    """Create a random bearer token: prints it once (give it to the client) and the entry to configure."""
    from dicom_node.http.auth import ROLES, hash_secret
    from dicom_node.http.auth import new_token as make

    if role not in ROLES:
        raise fail(f"--role {role!r} is not one of {', '.join(ROLES)}")
    token = make()
    typer.echo(f"# token (shown once): {token}")
    typer.echo(f'[[http.tokens]]\nname = "{name}"\nrole = "{role}"\ntoken_hash = "{hash_secret(token)}"')


def register(app: typer.Typer) -> None:
    app.add_typer(http_app, name="http")
