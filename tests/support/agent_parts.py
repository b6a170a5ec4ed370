"""Agent parts that tests write into their apps' `parts.py` (as source: agents import them)."""

HANG_ONCE = '''
@actuator("hang_once")
def hang_once(obs, ctx, dir):
    """The first call hangs (until the test kills the agent); a resumed call finishes."""
    log = Path(dir) / "hang.log"
    with open(log, "a") as f:
        f.write(f"begin {ctx.action_key} {ctx.action.attempt}\\n")
    while not ctx.action.resumed:
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"end {ctx.action_key} {ctx.action.attempt}\\n")
    return {"finished": True}
'''
"""Needs `time`, `Path` and `actuator` imported by the parts file it goes into."""
