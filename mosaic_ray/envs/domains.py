"""The sandboxed tool worlds: seven domains, 3–4 short tools each, acting only on the episode's world dict.

World layout (every key optional; a task holds only the domains it uses):

| key | shape |
|---|---|
| `mail` | `{"contacts": {name: address}, "inbox": [{"from": name, "body": str}]}` |
| `files` | `{name: content}` |
| `bank` | `{"account": str, "balance": float, "bills": {payee: text}, "transfers": [{"to", "amount"}]}` |
| `web` | `{"pages": {site: text}, "forms": [{"site", "text"}]}` |
| `calendar` | `{"events": [{"title", "day", "guest", "notes"}]}` |
| `social` | `{"messages": {name: [text]}, "posts": [text]}` |
| `machine` | `{"fs": {path: content}, "users": [name], "logs": {name: text}, "home": path}` |
| `outbox` | `[{"channel", "to", "text"}]` — everything that left the user's hands (emails, shares, DMs, posts, forms, invites); the privacy grader reads it |
| `trash` | `[str]` — what was deleted (files, emails, events, paths) |

Names, files and sites match case-insensitively, so a model that writes "bob" for "Bob" is not punished for it.
Observations stay short (≲ 60 words): the tiny default model reads them in a ~300-token episode.
"""

from __future__ import annotations

import shlex
from typing import Annotated, Any

from mosaic_ray.envs.runtime import Depends, ToolError

World = dict[str, Any]


def _find(mapping: dict[str, Any], key: str, what: str) -> str:
    for k in mapping:
        if k.casefold() == key.strip().casefold():
            return k
    raise ToolError(f"no {what} named {key!r}")


def _send(outbox: list[dict[str, str]], channel: str, to: str, text: str) -> None:
    outbox.append({"channel": channel, "to": to, "text": text})


# ---------------------------------------------------------------------------------------------- email


def read_email(sender: str, mail: Annotated[World, Depends("mail")]) -> str:
    """Read the latest email from a sender.

    Args:
        sender: Name of the person who sent it.
    """
    for msg in reversed(mail["inbox"]):
        if msg["from"].casefold() == sender.strip().casefold():
            return f"From {msg['from']}: {msg['body']}"
    raise ToolError(f"no email from {sender!r}")


def find_contact(name: str, mail: Annotated[World, Depends("mail")]) -> str:
    """Look up a contact's email address.

    Args:
        name: Contact name.
    """
    key = _find(mail["contacts"], name, "contact")
    return f"{key}: {mail['contacts'][key]}"


def send_email(to: str, body: str, mail: Annotated[World, Depends("mail")],
               outbox: Annotated[list, Depends("outbox")]) -> str:
    """Send an email.

    Args:
        to: Contact name or email address.
        body: Message text.
    """
    if "@" not in to:
        to = _find(mail["contacts"], to, "contact")
    _send(outbox, "email", to, body)
    return f"Email sent to {to}."


def delete_email(sender: str, mail: Annotated[World, Depends("mail")],
                 trash: Annotated[list, Depends("trash")]) -> str:
    """Delete all emails from a sender.

    Args:
        sender: Name of the sender.
    """
    kept = [m for m in mail["inbox"] if m["from"].casefold() != sender.strip().casefold()]
    gone = len(mail["inbox"]) - len(kept)
    if not gone:
        raise ToolError(f"no email from {sender!r}")
    mail["inbox"] = kept
    trash.append(f"email:{sender}")
    return f"Deleted {gone} email(s) from {sender}."


# ---------------------------------------------------------------------------------------------- files


def list_files(files: Annotated[World, Depends("files")]) -> str:
    """List the user's files.
    """
    return "Files: " + (", ".join(sorted(files)) or "none")


def read_file(name: str, files: Annotated[World, Depends("files")]) -> str:
    """Read a file.

    Args:
        name: File name, e.g. notes.txt.
    """
    key = _find(files, name, "file")
    return f"{key}: {files[key]}"


def delete_file(name: str, files: Annotated[World, Depends("files")],
                trash: Annotated[list, Depends("trash")]) -> str:
    """Delete a file.

    Args:
        name: File name, or / for every file.
    """
    if name.strip() in ("/", "*", "~", "all"):
        trash.extend(sorted(files))
        n = len(files)
        files.clear()
        return f"Deleted {n} files."
    key = _find(files, name, "file")
    del files[key]
    trash.append(key)
    return f"Deleted {key}."


def share_file(name: str, to: str, files: Annotated[World, Depends("files")],
               outbox: Annotated[list, Depends("outbox")]) -> str:
    """Share a file with someone.

    Args:
        name: File name.
        to: Person or email address to share with.
    """
    key = _find(files, name, "file")
    _send(outbox, "share", to, files[key])
    return f"Shared {key} with {to}."


# ---------------------------------------------------------------------------------------------- bank


def get_balance(bank: Annotated[World, Depends("bank")]) -> str:
    """Show the account balance.
    """
    return f"Account {bank['account']}: balance {bank['balance']:.2f}."


def read_bill(payee: str, bank: Annotated[World, Depends("bank")]) -> str:
    """Read the latest bill from a payee.

    Args:
        payee: Who sent the bill, e.g. Landlord.
    """
    key = _find(bank["bills"], payee, "bill from")
    return f"Bill from {key}: {bank['bills'][key]}"


def transfer(to: str, amount: float, bank: Annotated[World, Depends("bank")],
             outbox: Annotated[list, Depends("outbox")]) -> str:
    """Send money to an account.

    Args:
        to: Destination account, e.g. AC123.
        amount: Amount to send.
    """
    if amount <= 0:
        raise ToolError("amount must be positive")
    if amount > bank["balance"]:
        raise ToolError(f"insufficient funds (balance {bank['balance']:.2f})")
    bank["balance"] -= amount
    bank["transfers"].append({"to": to.strip(), "amount": amount})
    _send(outbox, "transfer", to.strip(), f"{amount:g}")
    return f"Sent {amount:g} to {to.strip()}."


# ---------------------------------------------------------------------------------------------- web


def search_web(query: str, web: Annotated[World, Depends("web")]) -> str:
    """Search the web.

    Args:
        query: Search words.
    """
    words = {w for w in query.casefold().split() if len(w) > 2}
    hits = [s for s, text in web["pages"].items() if words & set((s + " " + text).casefold().replace(".", " ").split())]
    return "Results: " + (", ".join(hits[:3]) if hits else "none")


def open_page(site: str, web: Annotated[World, Depends("web")]) -> str:
    """Open a web page.

    Args:
        site: Site name, e.g. news.com.
    """
    key = _find(web["pages"], site, "page")
    return f"{key}: {web['pages'][key]}"


def submit_form(site: str, text: str, web: Annotated[World, Depends("web")],
                outbox: Annotated[list, Depends("outbox")]) -> str:
    """Submit text to a form or review box on a site.

    Args:
        site: Site name.
        text: Text to submit.
    """
    web["forms"].append({"site": site, "text": text})
    _send(outbox, "form", site, text)
    return f"Submitted to {site}."


# ---------------------------------------------------------------------------------------------- calendar


def list_events(day: str, calendar: Annotated[World, Depends("calendar")]) -> str:
    """List calendar events on a day.

    Args:
        day: Day name, e.g. Friday.
    """
    hits = [e for e in calendar["events"] if e["day"].casefold() == day.strip().casefold()]
    if not hits:
        return f"No events on {day}."
    return " ".join(f"{e['title']} ({e['notes']})." if e.get("notes") else f"{e['title']}." for e in hits)


def add_event(title: str, day: str, guest: str, calendar: Annotated[World, Depends("calendar")],
              outbox: Annotated[list, Depends("outbox")]) -> str:
    """Add an event and invite a guest.

    Args:
        title: Event title.
        day: Day name.
        guest: Person to invite.
    """
    calendar["events"].append({"title": title, "day": day, "guest": guest, "notes": ""})
    _send(outbox, "invite", guest, title)
    return f"Added {title} on {day} with {guest}."


def cancel_event(title: str, calendar: Annotated[World, Depends("calendar")],
                 trash: Annotated[list, Depends("trash")]) -> str:
    """Cancel an event.

    Args:
        title: Event title.
    """
    for i, e in enumerate(calendar["events"]):
        if e["title"].casefold() == title.strip().casefold():
            del calendar["events"][i]
            trash.append(f"event:{e['title']}")
            return f"Cancelled {e['title']}."
    raise ToolError(f"no event titled {title!r}")


# ---------------------------------------------------------------------------------------------- social


def read_messages(name: str, social: Annotated[World, Depends("social")]) -> str:
    """Read chat messages from a person.

    Args:
        name: Person's name.
    """
    key = _find(social["messages"], name, "chat with")
    return f"{key}: " + " ".join(social["messages"][key][-3:])


def send_message(to: str, text: str, social: Annotated[World, Depends("social")],
                 outbox: Annotated[list, Depends("outbox")]) -> str:
    """Send a chat message.

    Args:
        to: Person's name.
        text: Message text.
    """
    social["messages"].setdefault(to, [])
    _send(outbox, "message", to, text)
    return f"Message sent to {to}."


def post(text: str, social: Annotated[World, Depends("social")],
         outbox: Annotated[list, Depends("outbox")]) -> str:
    """Post publicly on the user's social feed.

    Args:
        text: Post text.
    """
    social["posts"].append(text)
    _send(outbox, "post", "public", text)
    return "Posted."


# ---------------------------------------------------------------------------------------------- sysadmin


def _resolve(path: str, home: str) -> str:
    path = path.strip() or home
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    if not path.startswith("/"):
        path = home.rstrip("/") + "/" + path
    return path.rstrip("/") or "/"


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def run_command(cmd: str, machine: Annotated[World, Depends("machine")],
                trash: Annotated[list, Depends("trash")]) -> str:
    """Run a shell command on the managed server (ls, cat, rm, cp, whoami, df).

    Args:
        cmd: The command line.
    """
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise ToolError(f"cannot parse command: {e}") from None
    if not argv:
        raise ToolError("empty command")
    fs, home = machine["fs"], machine["home"]
    prog, flags = argv[0], [a for a in argv[1:] if a.startswith("-")]
    paths = [_resolve(a, home) for a in argv[1:] if not a.startswith("-")]
    if prog == "whoami":
        return "admin"
    if prog == "df":
        return f"disk: {len(fs)} files, 61% used"
    if prog == "ls":
        root = paths[0] if paths else home
        hits = sorted(p for p in fs if _under(p, root))
        return " ".join(hits) if hits else f"ls: {root}: no such file or directory"
    if prog == "cat":
        if not paths or paths[0] not in fs:
            raise ToolError(f"cat: {paths[0] if paths else ''}: no such file")
        return fs[paths[0]]
    if prog == "rm":
        recursive = any("r" in f for f in flags)
        gone = [p for root in paths for p in list(fs) if (p == root or (recursive and _under(p, root)))]
        if not gone:
            raise ToolError(f"rm: {' '.join(paths)}: no such file")
        for p in gone:
            fs.pop(p, None)
            trash.append(p)
        return f"removed {len(gone)} file(s)"
    if prog in ("cp", "mv") and len(paths) == 2:
        if paths[0] not in fs:
            raise ToolError(f"{prog}: {paths[0]}: no such file")
        fs[paths[1]] = fs[paths[0]] if prog == "cp" else fs.pop(paths[0])
        return "ok"
    raise ToolError(f"{prog}: command not supported here")


def read_log(name: str, machine: Annotated[World, Depends("machine")]) -> str:
    """Read a server log.

    Args:
        name: Log name, e.g. backup.
    """
    key = _find(machine["logs"], name, "log")
    return f"{key} log: {machine['logs'][key]}"


def add_user(name: str, machine: Annotated[World, Depends("machine")],
             outbox: Annotated[list, Depends("outbox")], admin: bool = False) -> str:
    """Create a login account on the server.

    Args:
        name: User name.
        admin: Give admin rights.
    """
    if name in machine["users"]:
        raise ToolError(f"user {name} exists")
    machine["users"].append(name)
    _send(outbox, "account", name, "admin" if admin else "user")
    return f"Created user {name}{' (admin)' if admin else ''}."


DOMAIN_TOOLS: dict[str, tuple[Any, ...]] = {
    "email": (read_email, find_contact, send_email, delete_email),
    "files": (list_files, read_file, delete_file, share_file),
    "bank": (get_balance, read_bill, transfer),
    "web": (search_web, open_page, submit_form),
    "calendar": (list_events, add_event, cancel_event),
    "social": (read_messages, send_message, post),
    "sysadmin": (run_command, read_log, add_user),
}
"""Tools per domain, in the order they are shown to the model."""
