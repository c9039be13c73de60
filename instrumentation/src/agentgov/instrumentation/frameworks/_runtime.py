"""What every framework instrumentor shares: settings, governed runs, tool facts and stops.

An instrumentor builds one :class:`Runtime` from its ``instrument(**kwargs)`` options and the
environment (:meth:`Settings.from_kwargs`). For each run of the framework it opens a
:class:`Run` (:meth:`Runtime.aopen_run`, or :meth:`Runtime.open_run` in blocking code):

- inside an agentgov agent (the current context holds its lineage) the run is a delegation
  from that agent, decided by the governor first;
- a run the framework starts for a delegation already decided (an agent called as a tool)
  takes that decision with it (``pending=``);
- otherwise it is the root of a new session whose intent is the run's input; its span is
  an ``invoke_workflow`` span and the starting agent's ``invoke_agent`` span is its child.
  The first root run of a process started with a handoff's carrier (``TRACEPARENT``,
  ``BAGGAGE``, ``AGENTGOV_LINEAGE_TOKEN``) takes that handoff instead.

Within a run, :meth:`Run.ahandoff` hands control to a sibling agent (a delegation by the
source: the target's span names the source as its parent), :meth:`Run.adelegate` decides a
delegation whose run starts later, :meth:`Run.tool` prepares a governed tool call from the
tool's arguments, :meth:`Run.checkpoint` raises once the session was killed, and
:meth:`Run.aclose` ends every span. A stop reaches the framework's own brake as
:class:`~agentgov.instrumentation.governor.Stopped`; :meth:`Run.fallback` lets the app's
``on_stop`` hook take over, :meth:`Run.stopped` notes a stop the run ends with.

What every framework's side does the same way lives here too: :func:`framework_error` turns
a stop into the framework's own kind of exception, :func:`ends_session` tells a stop that
ends the whole session's work from a step's, :func:`release` (:func:`arelease`) ends an
allowed delegation the framework never ran, :func:`open_detached` opens a tool call's span
without making it current, and :func:`put_back` restores a patched attribute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from agentgov.instrumentation import conventions as cv
from agentgov.instrumentation.governor import (
    APPROVALS,
    AsyncGovernorClient,
    GovernorClient,
    SessionKilled,
    Stopped,
)
from agentgov.instrumentation.lineage import (
    InvalidIdError,
    Lineage,
    check_id,
    current_lineage,
    new_session_id,
    with_lineage,
)
from agentgov.instrumentation.propagation import extract
from agentgov.instrumentation.spans import AgentSpan, Governance, SessionScope, ToolSpan

log = logging.getLogger("agentgov.instrumentation.frameworks")

#: the app's constrained-mode hook: called with the framework's orchestrating agent and the
#: stop; what it returns is framework-specific (each framework's page says what it does)
StopFallback = Callable[[Any, Stopped], Any]

ENV_URL = "AGENTGOV_URL"
ENV_API_KEY = "AGENTGOV_API_KEY"
ENV_MODE = "AGENTGOV_MODE"
ENV_APPROVALS = "AGENTGOV_APPROVALS"
ENV_APPROVAL_TIMEOUT = "AGENTGOV_APPROVAL_TIMEOUT"
OPTIONS = ("tracer_provider", "governor", "approvals", "approval_timeout", "on_stop", "mode")

COMMAND_KEYS = cv.TOOL_COMMAND_ARGUMENTS
RESOURCE_KEYS = cv.TOOL_RESOURCE_ARGUMENTS
#: how many conversations a runtime remembers as having had their root run (the least
#: recently seen are forgotten past it)
CONVERSATIONS = 4096
#: what :func:`put_back` restores for an attribute its owner did not have of its own
MISSING: Any = object()

StopT = TypeVar("StopT", bound=Stopped)


@dataclass(frozen=True)
class Settings:
    """An instrumentor's options.

    ``tracer_provider``: where spans go (default: the global provider). ``governor``: the
    client that decides (default: an :class:`AsyncGovernorClient` for ``AGENTGOV_URL`` with
    ``AGENTGOV_API_KEY`` when ``AGENTGOV_URL`` is set, else tracing only; pass ``None`` for
    tracing only). ``approvals``: ``wait`` or ``raise`` on ``approval_required``
    (``AGENTGOV_APPROVALS``); ``approval_timeout`` bounds a wait in seconds
    (``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop``: the app's fallback hook. ``mode``:
    ``enforce`` or ``observe`` for the default governor (``AGENTGOV_MODE``).
    """

    tracer_provider: TracerProvider | None = None
    governor: GovernorClient | None = None
    approvals: str = "wait"
    approval_timeout: float | None = None
    on_stop: StopFallback | None = None
    mode: str = "enforce"
    #: the governor was made here (from the environment), so it is closed here too
    owns_governor: bool = False

    @classmethod
    def from_kwargs(
        cls, kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Options from ``instrument(**kwargs)``, with the environment's as defaults."""
        env = os.environ if environ is None else environ
        unknown = sorted(set(kwargs) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown instrumentor option(s) {', '.join(unknown)}; "
                f"the options are {', '.join(OPTIONS)}"
            )
        mode = str(kwargs.get("mode") or env.get(ENV_MODE) or "enforce")
        if mode not in ("enforce", "observe"):
            raise ValueError(f"mode {mode!r}: use 'enforce' or 'observe'")
        approvals = str(kwargs.get("approvals") or env.get(ENV_APPROVALS) or "wait")
        if approvals not in APPROVALS:
            raise ValueError(f"approvals {approvals!r}: use 'wait' or 'raise'")
        timeout = kwargs.get("approval_timeout")
        if timeout is None and env.get(ENV_APPROVAL_TIMEOUT):
            try:
                timeout = float(env[ENV_APPROVAL_TIMEOUT])
            except ValueError:
                raise ValueError(
                    f"{ENV_APPROVAL_TIMEOUT}={env[ENV_APPROVAL_TIMEOUT]!r}: give seconds"
                ) from None
        if "governor" in kwargs:
            governor = kwargs["governor"]
        elif env.get(ENV_URL):
            governor = AsyncGovernorClient(
                env[ENV_URL],
                api_key=env.get(ENV_API_KEY) or None,
                mode=mode,
                approvals=approvals,
                approval_timeout=300.0 if timeout is None else float(timeout),
            )
        else:
            governor = None
        return cls(
            tracer_provider=kwargs.get("tracer_provider"),
            governor=governor,
            approvals=approvals,
            approval_timeout=None if timeout is None else float(timeout),
            on_stop=kwargs.get("on_stop"),
            mode=mode,
            owns_governor="governor" not in kwargs and governor is not None,
        )


def tool_facts(arguments: Any) -> tuple[str, list[str]]:
    """The command text and the resources of a tool call, from its arguments (a mapping, or
    JSON text, or a bare string, which is then the command itself).

    The argument names are the conventions' (``TOOL_COMMAND_ARGUMENTS``), the ones the
    collector reads from foreign spans; a call's only string argument is its command too."""
    args = arguments
    if isinstance(args, bytes):
        args = args.decode("utf-8", "replace")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return args, []
    if isinstance(args, str):
        return args, []
    if not isinstance(args, Mapping):
        return "", []
    command = next(
        (v for k in COMMAND_KEYS if isinstance(v := args.get(k), str) and v),
        "",
    )
    if not command and len(args) == 1:
        # a tool of one string argument is judged by it, whatever its name (the
        # instrumentor sees the call itself; the collector, reading other instrumentations'
        # serialized arguments, goes by the names alone)
        (only,) = args.values()
        if isinstance(only, str):
            command = only
    resources: list[str] = []
    for key in RESOURCE_KEYS:
        value = args.get(key)
        if isinstance(value, str) and value:
            resources.append(value)
        elif isinstance(value, list | tuple):
            resources += [str(x) for x in value if x]
    return command, resources


def task_text(arguments: Any, member: str = "input") -> str:
    """The text a delegation or handoff carries: ``member`` of its JSON arguments, or the
    arguments themselves when they say anything more than ``{}``."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
    else:
        parsed = arguments
    if isinstance(parsed, Mapping):
        value = parsed.get(member)
        if isinstance(value, str):
            return value
        return json.dumps(parsed, sort_keys=True) if parsed else ""
    return "" if parsed is None else str(parsed)


def stop_message(stop: Stopped) -> str:
    """How a stop reads where the framework shows it as a step's result (to the model)."""
    return f"[agentgov] {stop}"


def ends_session(stop: Stopped) -> bool:
    """Whether ``stop`` ends the whole session's work (a kill, the shared budget spent): it
    ends every run it reaches, never a step's result."""
    return isinstance(stop, SessionKilled) or stop.phase == "usage"


def framework_error(
    stop: Stopped,
    cls: type[StopT],
    killed: type[StopT] | None = None,
    *,
    text: str | None = None,
    **fields: Any,
) -> StopT:
    """``stop`` as the framework's own kind of exception: ``cls`` (or, for a session kill,
    ``killed``), a subclass of the stop's class and of the framework's exception, with the
    stop's message (or ``text``) and fields (and ``fields`` more). The framework's
    ``__init__`` is not called; ``stop`` is returned as it is when it is one already."""
    target = killed if killed is not None and isinstance(stop, SessionKilled) else cls
    if isinstance(stop, target):
        return stop
    err = target.__new__(target)
    Exception.__init__(err, *(stop.args if text is None else (text,)))
    err.__dict__.update(stop.__dict__)
    err.__dict__.update(fields)
    return err


def release(agent: AgentSpan) -> Stopped | None:
    """End a delegation the governor allowed but the framework never ran, so the governor
    frees it. A killed session starts nothing (the governor holds nothing for it): its
    kill is returned."""
    try:
        agent.start()
    except Stopped as stop:
        return stop
    agent.end()
    return None


async def arelease(agent: AgentSpan) -> Stopped | None:
    """:func:`release` without holding the event loop."""
    try:
        await agent.astart()
    except Stopped as stop:
        return stop
    await agent.aend()
    return None


def open_detached(span: ToolSpan) -> ToolSpan:
    """Start a decided call's span without making it current: the context the call runs in
    is its caller's to set (or none, for a call that runs elsewhere)."""
    span.open()
    span._detach()
    return span


def put_back(owner: Any, name: str, original: Any, replacement: Any) -> bool:
    """Put ``original`` back as ``owner``'s attribute ``name`` (delete it when it was
    :data:`MISSING`: the owner had none of its own) where ``replacement`` still is; False,
    leaving it, when someone replaced it since (a wrapper of ours inside theirs then passes
    every call through)."""
    if vars(owner).get(name) is not replacement:
        return False
    if original is MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, original)
    return True


class Runtime:
    """One instrumentor's governance: the settings, and the runs it opens."""

    def __init__(self, framework: str, settings: Settings) -> None:
        self.framework = framework
        self.settings = settings
        self.gov = Governance(
            settings.tracer_provider,
            governor=settings.governor,
            approvals=settings.approvals,
            approval_timeout=settings.approval_timeout,
        )
        self._lock = threading.Lock()
        self._carrier_taken = False
        #: the sessions of conversations that had their root run (most recent last)
        self._conversations: OrderedDict[str, None] = OrderedDict()

    @property
    def governor(self) -> GovernorClient | None:
        return self.settings.governor

    def close(self) -> None:
        """Stop the governor's session listeners, if the runtime made the governor."""
        if self.settings.owns_governor and self.settings.governor is not None:
            self.settings.governor.close()

    # -- opening runs ---------------------------------------------------------------------

    def _session_id(self, conversation_id: str | None) -> str:
        """The session of a root run: the framework's conversation id when it fits the id
        alphabet (else a digest of it), once per process: a session has one root, so later
        runs of the same conversation get their own session named after it. The last
        :data:`CONVERSATIONS` conversations are remembered."""
        if not conversation_id:
            return new_session_id()
        try:
            sid = check_id(conversation_id, "session id")
        except InvalidIdError:
            digest = hashlib.sha256(conversation_id.encode("utf-8", "replace")).hexdigest()
            sid = f"conv-{digest[:32]}"
        with self._lock:
            if sid in self._conversations:
                self._conversations.move_to_end(sid)
                return f"{sid[:100]}-{new_session_id()[5:17]}"
            self._conversations[sid] = None
            if len(self._conversations) > CONVERSATIONS:
                self._conversations.popitem(last=False)
        return sid

    def _env_carrier(self) -> Mapping[str, str] | None:
        """The handoff this process was started with, for its first root run only."""
        with self._lock:
            if self._carrier_taken:
                return None
            self._carrier_taken = True
        lineage = current_lineage(extract(os.environ))
        return os.environ if lineage is not None and lineage.handoff_to else None

    def _workflow(self, scope: SessionScope, name: str) -> Span:
        attrs: dict[str, Any] = {
            cv.OPERATION_NAME: cv.OP_INVOKE_WORKFLOW,
            cv.WORKFLOW_NAME: name,
            cv.SESSION_ID: scope.session_id,
            cv.CONVERSATION_ID: scope.session_id,
            cv.INTENT: scope.intent,
            "agentgov.framework": self.framework,
        }
        return self.gov.tracer.start_span(
            f"invoke_workflow {name}", kind=SpanKind.INTERNAL, attributes=attrs
        )

    async def aopen_run(
        self,
        agent_name: str,
        *,
        input_text: str = "",
        conversation_id: str | None = None,
        workflow_name: str | None = None,
        framework_agent: object = None,
        pending: AgentSpan | None = None,
    ) -> Run:
        """Open a governed run of ``agent_name`` (see the module's docstring); the start is
        decided without holding the event loop. A stop raises
        :class:`~agentgov.instrumentation.governor.Stopped` and leaves nothing open."""
        if pending is not None:
            run = Run(self, pending.session_id, None)
            await pending.astart()
            run._started(pending, framework_agent)
            return run
        lineage = current_lineage()
        carrier = self._env_carrier() if lineage is None else None
        if (lineage is not None and lineage.agent_id) or carrier is not None:
            agent = await self.gov.aagent(agent_name, task=input_text, carrier=carrier)
            run = Run(self, agent.session_id, None)
            await agent.astart()
            run._started(agent, framework_agent)
            return run
        scope = self._scope(lineage, input_text, conversation_id)
        workflow = self._workflow(scope, workflow_name or agent_name)
        token = otel_context.attach(
            with_lineage(scope.lineage, trace.set_span_in_context(workflow))
        )
        try:
            agent = await scope.aagent(agent_name)
            await agent.astart()
        except BaseException as exc:
            _end_span(workflow, exc)
            raise
        finally:
            otel_context.detach(token)
        run = Run(self, scope.session_id, workflow)
        run._started(agent, framework_agent)
        return run

    def open_run(
        self,
        agent_name: str,
        *,
        input_text: str = "",
        conversation_id: str | None = None,
        workflow_name: str | None = None,
        framework_agent: object = None,
        pending: AgentSpan | None = None,
    ) -> Run:
        """:meth:`aopen_run` for blocking code."""
        if pending is not None:
            run = Run(self, pending.session_id, None)
            pending.start()
            run._started(pending, framework_agent)
            return run
        lineage = current_lineage()
        carrier = self._env_carrier() if lineage is None else None
        if (lineage is not None and lineage.agent_id) or carrier is not None:
            agent = self.gov.agent(agent_name, task=input_text, carrier=carrier)
            run = Run(self, agent.session_id, None)
            agent.start()
            run._started(agent, framework_agent)
            return run
        scope = self._scope(lineage, input_text, conversation_id)
        workflow = self._workflow(scope, workflow_name or agent_name)
        token = otel_context.attach(
            with_lineage(scope.lineage, trace.set_span_in_context(workflow))
        )
        try:
            agent = scope.agent(agent_name)
            agent.start()
        except BaseException as exc:
            _end_span(workflow, exc)
            raise
        finally:
            otel_context.detach(token)
        run = Run(self, scope.session_id, workflow)
        run._started(agent, framework_agent)
        return run

    def _scope(
        self, lineage: Lineage | None, input_text: str, conversation_id: str | None
    ) -> SessionScope:
        if lineage is not None:  # a session opened by the app, with no agent yet
            return SessionScope(self.gov, lineage)
        return self.gov.session(input_text, session_id=self._session_id(conversation_id))


class Run:
    """One governed framework run: its agents' spans, keyed by the framework's agent objects.

    Framework agents are keyed by identity; the run holds them until it closes, so an id is
    never reused while the run looks it up.
    """

    def __init__(self, runtime: Runtime, session_id: str, workflow: Span | None) -> None:
        self.runtime = runtime
        self.session_id = session_id
        #: the root's ``invoke_workflow`` span (None when the run is a delegation)
        self.workflow = workflow
        #: the agent the run started with, and the one that has control now
        self.first: AgentSpan | None = None
        self.current: AgentSpan | None = None
        #: every stop the governor made in this run, in order
        self.stops: list[Stopped] = []
        self._by_object: dict[int, AgentSpan] = {}
        self._by_name: dict[str, AgentSpan] = {}
        self._objects: list[object] = []
        self._open: list[AgentSpan] = []
        self._closed = False

    @property
    def root(self) -> bool:
        return self.workflow is not None

    @property
    def governor(self) -> GovernorClient | None:
        return self.runtime.governor

    def _started(self, agent: AgentSpan, framework_agent: object) -> None:
        if self.first is None:
            self.first = agent
        self.current = agent
        self._open.append(agent)
        self.bind(framework_agent, agent)

    def bind(self, framework_agent: object, agent: AgentSpan) -> None:
        """Say that ``framework_agent`` acts as ``agent`` in this run (e.g. a constrained
        replacement the fallback hook returned)."""
        if framework_agent is None:
            return
        self._by_object[id(framework_agent)] = agent
        self._objects.append(framework_agent)
        name = getattr(framework_agent, "name", None)
        if isinstance(name, str):
            self._by_name.setdefault(name, agent)

    def agent_of(self, framework_agent: object) -> AgentSpan:
        """The span of ``framework_agent`` in this run (by identity, then by name), else the
        agent that has control now."""
        found = self._by_object.get(id(framework_agent))
        if found is None:
            name = getattr(framework_agent, "name", None)
            found = self._by_name.get(name) if isinstance(name, str) else None
        if found is None:
            found = self.current
        if found is None:
            raise RuntimeError("the run has no agent yet")
        return found

    # -- governed steps -------------------------------------------------------------------

    def checkpoint(self) -> None:
        """A step with no request: raises :class:`SessionKilled` once the session was
        stopped (an instant, local check)."""
        governor = self.governor
        if governor is not None:
            try:
                governor.check(self.session_id)
            except SessionKilled as stop:
                self.stopped(stop)
                raise

    def stopped(self, stop: StopT) -> StopT:
        """Note ``stop`` in :attr:`stops` (once), with no fallback: a stop the run ends with
        (a kill, a refusal the framework raises). Returns ``stop``."""
        if not self.stops or self.stops[-1] is not stop:
            self.stops.append(stop)
        return stop

    async def ahandoff(
        self,
        source: AgentSpan,
        target_name: str,
        task: str = "",
        framework_target: object = None,
        ends_source: bool = True,
    ) -> AgentSpan:
        """Hand control from ``source`` to a sibling agent: decided as ``source``'s
        delegation (:meth:`adelegate`), then taken (:meth:`atake`)."""
        target = await self.adelegate(source, target_name, task)
        return await self.atake(source, target, framework_target, ends_source)

    def handoff(
        self,
        source: AgentSpan,
        target_name: str,
        task: str = "",
        framework_target: object = None,
        ends_source: bool = True,
    ) -> AgentSpan:
        """:meth:`ahandoff` for blocking code."""
        target = self.delegate(source, target_name, task)
        return self.take(source, target, framework_target, ends_source)

    async def adelegate(
        self,
        source: AgentSpan,
        target_name: str,
        task: str = "",
        *,
        agent_id: str | None = None,
        message: str | None = None,
    ) -> AgentSpan:
        """Decide a delegation by ``source`` (a stop raises, after it was noted in
        :attr:`stops`); ``message`` (by default the task) is recorded as a message to the
        target. ``agent_id``: the target's id from an earlier delegation by ``source`` (the
        governor's re-delegation of the same agent). The target's span starts later: with
        :meth:`atake` for a handoff within this run, or as ``pending=`` of
        :meth:`Runtime.aopen_run` for a run of its own."""
        try:
            target = await source.adelegate(target_name, task=task, agent_id=agent_id)
        except Stopped as stop:
            self.stopped(stop)
            raise
        self._told(source, target, task if message is None else message)
        return target

    def delegate(
        self,
        source: AgentSpan,
        target_name: str,
        task: str = "",
        *,
        agent_id: str | None = None,
        message: str | None = None,
    ) -> AgentSpan:
        """:meth:`adelegate` for blocking code."""
        try:
            target = source.delegate(target_name, task=task, agent_id=agent_id)
        except Stopped as stop:
            self.stopped(stop)
            raise
        self._told(source, target, task if message is None else message)
        return target

    @staticmethod
    def _told(source: AgentSpan, target: AgentSpan, message: str) -> None:
        if message:
            source.message(target.agent_id, message)

    async def atake(
        self,
        source: AgentSpan,
        target: AgentSpan,
        framework_target: object = None,
        ends_source: bool = True,
    ) -> AgentSpan:
        """Start the decided ``target`` as the agent with control of this run; its span is
        the source's child even when the framework runs it as a sibling. ``ends_source``:
        the source will not act again in this run, so its span ends here."""
        await target.astart()
        self._started(target, framework_target)
        if ends_source and source is not target and source in self._open:
            self._open.remove(source)
            await source.aend()
        return target

    def take(
        self,
        source: AgentSpan,
        target: AgentSpan,
        framework_target: object = None,
        ends_source: bool = True,
    ) -> AgentSpan:
        """:meth:`atake` for blocking code."""
        target.start()
        self._started(target, framework_target)
        if ends_source and source is not target and source in self._open:
            self._open.remove(source)
            source.end()
        return target

    def tool(self, agent: AgentSpan, tool_name: str, arguments: Any) -> ToolSpan:
        """A governed call of ``tool_name`` by ``agent`` (not decided yet: use it with
        ``with`` / ``async with``, or :meth:`ToolSpan.adecide` then ``open``/``close``),
        its command and resources taken from ``arguments``."""
        command, resources = tool_facts(arguments)
        return agent.tool(tool_name, command=command, resources=resources)

    def fallback(self, framework_agent: object, stop: Stopped) -> Any:
        """Run the app's ``on_stop`` hook (with the framework's orchestrating agent); its
        answer, or None without a hook."""
        self.stopped(stop)
        hook = self.runtime.settings.on_stop
        return hook(framework_agent, stop) if hook is not None else None

    # -- ending -----------------------------------------------------------------------------

    async def aclose(self, exc: BaseException | None = None) -> None:
        """End every span the run opened (agents report that they finished)."""
        if self._closed:
            return
        self._closed = True
        agents, self._open = self._open, []
        for agent in reversed(agents):
            await agent.aend(exc)
        if self.workflow is not None:
            _end_span(self.workflow, exc)

    def close(self, exc: BaseException | None = None) -> None:
        """:meth:`aclose` for blocking code."""
        if self._closed:
            return
        self._closed = True
        agents, self._open = self._open, []
        for agent in reversed(agents):
            agent.end(exc)
        if self.workflow is not None:
            _end_span(self.workflow, exc)


def _end_span(span: Span, exc: BaseException | None) -> None:
    if exc is not None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()
