"""The error hierarchy: wire codes against the protocol document, one class per code,
typed RPC errors registered and chosen by code (no node needed; test_node.py checks them on a
real one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from btcchannel import errors
from btcchannel.bitcoind import errors as node_errors
from btcchannel.bitcoind.errors import (
    RPC_ERRORS,
    RpcInsufficientFunds,
    RpcInvalidAddressOrKey,
    RpcWalletError,
    from_rpc,
)
from btcchannel.errors import WIRE_CODES, ChannelError, InternalError, NodeError, error_for_code

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def all_classes() -> list[type[ChannelError]]:
    out: list[type[ChannelError]] = []
    todo = list(ChannelError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def node_family() -> list[type[NodeError]]:
    return [c for c in all_classes() if issubclass(c, NodeError) and c is not NodeError]


def protocol_codes() -> dict[str, int]:
    """``code -> HTTP status`` from the table in PROTOCOL.md's "Error codes" section."""
    text = PROTOCOL.read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([a-z_]+)`\s*\|\s*(\d{3})\s*\|", section, re.MULTILINE)
    assert rows, "no error table found in PROTOCOL.md"
    codes = dict((code, int(status)) for code, status in rows)
    assert len(codes) == len(rows), "a code is listed twice in PROTOCOL.md"
    return codes


def test_wire_codes_are_the_protocols() -> None:
    documented = protocol_codes()
    assert WIRE_CODES == frozenset(documented)
    for cls in all_classes():
        assert cls.wire == (cls.code in documented), cls
        if cls.wire:
            assert cls.http_status == documented[cls.code], cls
    assert not ChannelError.wire  # codes are local until the protocol names them


def test_one_class_per_code_except_the_node_family() -> None:
    """One class per code in the hierarchy; a refinement elsewhere (a subclass carrying more, such as
    the buyer's ``NoChannel``) keeps its parent's code."""
    seen: dict[str, type[ChannelError]] = {}
    for cls in all_classes():
        if issubclass(cls, NodeError) and cls is not NodeError:
            continue
        if "code" not in vars(cls):  # a refinement with its parent's code
            assert cls.__module__ != "btcchannel.errors", f"{cls.__name__} names no code of its own"
            continue
        assert cls.code not in seen, f"{cls.__name__} and {seen[cls.code].__name__} share {cls.code!r}"
        seen[cls.code] = cls
    family = node_family()
    assert len(family) >= 9
    assert {cls.code for cls in family} == {"node_error"}
    assert not any(cls.wire for cls in family)
    rpc_codes = [cls.RPC_ERROR_CODE for cls in family]
    assert len(set(rpc_codes)) == len(rpc_codes), "two classes claim one RPC code"
    assert 0 not in rpc_codes


def test_every_class_documents_its_code() -> None:
    for cls in [ChannelError, *all_classes()]:
        doc = cls.__dict__.get("__doc__") or ""
        assert doc.strip(), f"{cls.__name__} has no docstring"
        if issubclass(cls, NodeError) and cls is not NodeError:
            assert f"({cls.RPC_ERROR_CODE})" in doc, cls
        else:
            assert cls.code in doc, cls


def test_error_for_code() -> None:
    for cls in all_classes():
        if (issubclass(cls, NodeError) and cls is not NodeError) or "code" not in vars(cls):
            continue  # a family member, or a refinement that keeps its parent's code: the parent is rebuilt
        err = error_for_code(cls.code, "why")
        assert type(err) is cls and err.message == "why"
    node = error_for_code("node_error", "boom")
    assert type(node) is NodeError and node.rpc_code == 0
    assert type(error_for_code("internal")) is InternalError
    unknown = error_for_code("no_such_code")
    assert type(unknown) is ChannelError and unknown.message == "no_such_code"


def test_from_rpc_picks_the_class_for_the_code() -> None:
    for cls in node_family():
        err = from_rpc(cls.RPC_ERROR_CODE, "getfoo: nope")
        assert type(err) is cls
        assert err.rpc_code == cls.RPC_ERROR_CODE and err.message == "getfoo: nope"
        assert err.code == "node_error" and err.http_status == 502
        assert err.to_json() == {"error": {"code": "node_error", "message": "getfoo: nope"}}
    other = from_rpc(-31, "p2p disabled")
    assert type(other) is NodeError and other.rpc_code == -31
    assert type(from_rpc(-4, "createwallet: Database already exists.")) is RpcWalletError
    short = from_rpc(-4, "fundrawtransaction: Insufficient funds")
    assert type(short) is RpcInsufficientFunds and short.rpc_code == -4


def test_the_node_errors_are_registered_by_code_in_bitcoind() -> None:
    """Each per-code class lives with the node (bitcoind/errors.py, not the top-level errors.py)
    and is the one registered for its code; the registry holds nothing else."""
    family = node_family()
    assert RPC_ERRORS == {cls.RPC_ERROR_CODE: cls for cls in family}
    for cls in family:
        assert cls.__module__ == node_errors.__name__, cls
        assert cls.__name__ in node_errors.__all__, cls
        assert not hasattr(errors, cls.__name__), f"{cls.__name__} is still in btcchannel.errors"


def test_node_error_constructors() -> None:
    assert NodeError("x").rpc_code == 0
    assert NodeError("x", rpc_code=-5).rpc_code == -5
    assert NodeError("x", -5).rpc_code == -5
    assert RpcInvalidAddressOrKey("x").rpc_code == -5
    with pytest.raises(RpcInvalidAddressOrKey):
        raise from_rpc(-5, "No such mempool or blockchain transaction")


def test_rpc_codes_are_bitcoinds() -> None:
    """The numbers of bitcoind's src/rpc/protocol.h, each registered to the class that names it."""
    expected = {
        "RPC_MISC_ERROR": -1,
        "RPC_TYPE_ERROR": -3,
        "RPC_WALLET_ERROR": -4,
        "RPC_INVALID_ADDRESS_OR_KEY": -5,
        "RPC_WALLET_INSUFFICIENT_FUNDS": -6,
        "RPC_INVALID_PARAMETER": -8,
        "RPC_WALLET_NOT_FOUND": -18,
        "RPC_WALLET_NOT_SPECIFIED": -19,
        "RPC_DESERIALIZATION_ERROR": -22,
        "RPC_VERIFY_ERROR": -25,
        "RPC_VERIFY_REJECTED": -26,
        "RPC_VERIFY_ALREADY_IN_CHAIN": -27,
        "RPC_IN_WARMUP": -28,
        "RPC_WALLET_ALREADY_LOADED": -35,
        "RPC_METHOD_NOT_FOUND": -32601,
    }
    for name, number in expected.items():
        assert RPC_ERRORS[number].__doc__.startswith(f"{name} ({number})"), name
        assert type(from_rpc(number, "")) is not NodeError, name
    api = {
        "RpcInvalidAddressOrKey": -5,
        "RpcWalletError": -4,
        "RpcInsufficientFunds": -6,
        "RpcInvalidParameter": -8,
        "RpcWalletNotFound": -18,
        "RpcVerifyError": -25,
        "RpcVerifyRejected": -26,
        "RpcAlreadyInChain": -27,
        "RpcMethodNotFound": -32601,
    }
    for name, number in api.items():
        assert getattr(node_errors, name).RPC_ERROR_CODE == number, name


def test_local_codes_follow_the_wire_section() -> None:
    """errors.py has one section per kind, in this order: the wire codes, the local codes, the
    node's RPC errors; no class of one kind in another's section, none after them."""
    source = Path(errors.__file__).read_text()
    lines = source.splitlines()

    def section(title: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if line.startswith(f"# --- {title}"))

    bounds = [section("local codes"), section("the node's RPC errors"), section("codes")]
    kinds = ["wire", "local", "node", "helpers"]
    defined = {node.name: node.lineno for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    for cls in all_classes():
        if cls.__module__ != errors.__name__:
            continue
        where = kinds[sum(defined[cls.__name__] > b for b in bounds)]
        kind = "node" if issubclass(cls, NodeError) else "wire" if cls.wire else "local"
        assert where == kind, f"{cls.__name__} ({kind}) is in the {where} section"


def test_remote_marks_what_the_other_party_reported() -> None:
    """h11's local/remote distinction: an error rebuilt from the payee's error body is remote, one
    raised here is not; the mark is the instance's (the class keeps False)."""
    rebuilt = error_for_code("bad_request", "the payee refused it")
    assert isinstance(rebuilt, errors.BadRequest) and rebuilt.remote
    assert error_for_code("no_such_code").remote and error_for_code("node_error").remote
    assert not error_for_code("bad_request", remote=False).remote
    assert not errors.BadRequest("refused here").remote
    assert not from_rpc(-5, "No such transaction").remote
    assert not errors.BadRequest.remote and not ChannelError.remote


async def test_the_payers_http_layer_marks_the_payees_errors_remote() -> None:
    from aiohttp import web

    from btcchannel.payer.http import PayeeHttp

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "not_open", "message": "not open yet"}}, status=409)

    app = web.Application()
    app.router.add_get("/v1/info", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    class Http(PayeeHttp):
        timeout = 5.0
        _session = None

    http = Http()
    try:
        with pytest.raises(errors.NotOpen) as got:
            await http.info(f"http://127.0.0.1:{port}")
        assert got.value.remote and got.value.message == "not open yet"
        with pytest.raises(errors.BadUrl) as local:
            await http.info("127.0.0.1:1")
        assert not local.value.remote
    finally:
        await http.session.close()
        await runner.cleanup()
