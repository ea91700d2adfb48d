"""The `apr` command group: lazy subcommand loading and one-line error translation."""

from __future__ import annotations

import difflib
import importlib
import os
import sys

import click

from apr_format.errors import AprError

# name -> "module:attribute"; modules are imported only when their command runs, so
# `apr inspect` never pays for torch or the converters.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("apr_cli.inspect_cmd:inspect_cmd", "Summarise an .apr, .safetensors file or HF folder."),
    "tensors": ("apr_cli.tensors_cmd:tensors_cmd", "List tensors: name, dtype, shape, bytes, offset."),
    "validate": ("apr_cli.validate_cmd:validate_cmd", "Check structure, CRC, alignment and NaN/Inf."),
    "convert": ("apr_cli.convert_cmd:convert_cmd", "Convert an HF checkpoint or GGUF file to .apr."),
    "import": ("apr_cli.convert_cmd:convert_cmd", "Alias of `apr convert` (aprender's name)."),
    "export": ("apr_cli.export_cmd:export_cmd", "Export an .apr to an HF folder, safetensors or GGUF file."),
    "diff": ("apr_cli.diff_cmd:diff_cmd", "Compare two checkpoints tensor by tensor."),
    "pretrain": ("apr_cli.pretrain_cmd:pretrain_cmd", "Train from --init model.apr or a built-in architecture."),
    "train": ("apr_cli.pretrain_cmd:pretrain_cmd", "Alias of `apr pretrain`."),
    "tokenize": ("apr_cli.tokenize_cmd:tokenize_cmd", "Tokenize text (.txt/.jsonl/.parquet, any size) into token shards for training."),
    "plot": ("apr_cli.plot_cmd:plot_cmd", "Draw training curves of run folders (metrics.jsonl) as a PNG."),
    "contract": ("apr_cli.contract_cmd:contract_cmd", "Check a falsifier contract file (development, needs a checkout)."),
    "eval": ("apr_cli.eval_cmd:eval_cmd", "Perplexity of a model on text or tokens."),
    "run": ("apr_cli.run_cmd:run_cmd", "Generate a continuation of a prompt."),
}

_NO_SUCH_COMMAND = getattr(click.exceptions, "NoSuchCommand", ())  # click >= 8.4
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # validate found problems, diff found differences
EXIT_ERROR = 2  # bad input, bad flags, unreadable or unwritable files
EXIT_INTERNAL = 3  # a bug in apr: please report it
EXIT_INTERRUPTED = 130


class AprCliError(click.ClickException):
    """A library error shown as one line on stderr, exit code 2."""

    exit_code = EXIT_ERROR

    def show(self, file=None) -> None:
        from .render import escape  # messages quote names from files: never let them drive the terminal

        click.echo(f"apr: error: {escape(self.format_message())}", err=True)


class AprGroup(click.Group):
    """Loads subcommands on first use and turns every failure into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if command.name != cmd_name:  # an alias: `apr train` = pretrain, `apr import` = convert
            command = _alias(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from the table, without importing them (keeps `apr -h` fast)."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, help_text) in sorted(COMMANDS.items())])

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # `apr` alone: the help, as a request for it (exit 0)
            click.echo(ctx.get_help())
            ctx.exit(EXIT_OK)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise AprCliError(_describe_usage_error(exc, ctx)) from exc

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AprError as exc:
            raise AprCliError(str(exc)) from exc
        except BrokenPipeError:  # `apr export -o - | head`: the reader had enough; quiet, as other CLIs
            _silence_stdout()
            ctx.exit(EXIT_OK)
        except OSError as exc:
            raise AprCliError(_describe_os_error(exc)) from exc
        except click.UsageError as exc:  # bad flags are bad input too: one line, exit 2
            raise AprCliError(_describe_usage_error(exc, ctx)) from exc
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("apr: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: one line, traceback only on request
            if os.environ.get("APR_DEBUG"):
                raise
            from .render import escape

            click.echo(
                f"apr: internal error: {type(exc).__name__}: {escape(exc)} "
                "(set APR_DEBUG=1 to see the traceback)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _alias(command: click.Command, name: str) -> click.Command:
    """A copy of `command` registered under another name (`apr train` = `apr pretrain`)."""
    alias = click.Command(
        name=name,
        callback=command.callback,
        params=command.params,
        help=command.help,
        short_help=command.short_help,
        context_settings=command.context_settings,
    )
    return alias


def _describe_os_error(exc: OSError) -> str:
    problem, where = exc.strerror or str(exc), exc.filename
    if where is None:  # e.g. stdout on a full disk: nothing better to name than the problem
        return problem
    return f"{os.fsdecode(where) if isinstance(where, (str, bytes, os.PathLike)) else where}: {problem}"


def _describe_usage_error(exc: click.UsageError, ctx: click.Context) -> str:
    """`-o/--output: missing (see 'apr convert -h')`: the flag or argument, the problem, where help is."""
    if exc.ctx is not None and exc.ctx is not ctx:
        where = exc.ctx.command_path
    else:  # raised while the subcommand's own context was being made
        where = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
    subject, problem = _usage_subject(exc, where)
    return f"{subject}: {problem} (see '{where} -h')"


def _usage_subject(exc: click.UsageError, where: str) -> tuple[str, str]:
    """(what is wrong: a flag, an argument or a command name, the problem in lower case)."""
    if isinstance(exc, click.MissingParameter) and exc.param is not None:
        return _param_name(exc.param), "missing (required)"
    if isinstance(exc, click.BadParameter):
        param = exc.param
        subject = _param_name(param) if param is not None else str(exc.param_hint or "argument")
        return subject, _lower_first(exc.message.rstrip("."))
    if isinstance(exc, click.NoSuchOption):
        hint = f"; did you mean {' or '.join(exc.possibilities)}?" if exc.possibilities else ""
        return exc.option_name, "no such option" + hint
    if isinstance(exc, click.BadOptionUsage):
        problem = "needs a value" if "requires an argument" in exc.message else _lower_first(exc.message.rstrip("."))
        return exc.option_name, problem
    if isinstance(exc, _NO_SUCH_COMMAND):  # top-level commands load lazily: click has no list to suggest from
        close = exc.possibilities or difflib.get_close_matches(exc.command_name, COMMANDS)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return exc.command_name, f"no such command{hint}"
    return where, _lower_first(exc.format_message().rstrip("."))


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        shown = [o for o in param.opts if o not in getattr(param, "hidden_aliases", ())]
        return "/".join(shown)
    return param.human_readable_name


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


@click.group(cls=AprGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="apr-toolkit", prog_name="apr")
def cli() -> None:
    """Inspect, validate, convert and train .apr (APR v2) model checkpoints.

    \b
    Examples:
      apr convert Qwen2.5-0.5B/ -o qwen.apr
      apr pretrain --init qwen.apr --data docs/ -o run
      apr export run/final.apr -o hf-model/

    Each command has its own help: apr COMMAND -h.
    """


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="apr", standalone_mode=True)
    except BrokenPipeError:  # `apr tensors x.apr | head`, raised outside a command
        _silence_stdout()
        sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()
