\* BackgroundAgents: the background agents of one shard (core/src/background.rs), checked by core/tests/model_background_agents.rs.
-------------------------- MODULE BackgroundAgents ---------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_background_agents.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* Companion of HostedAgent.tla. Background agents are spawned by people    *)
(* (through the API), by a person's hosted session, or by the session a     *)
(* running agent runs in; they wait queued until the scheduler starts them  *)
(* within the limits and in fair order, then run and complete, fail or are  *)
(* cancelled. A cancel cascades to everything spawned, transitively, from   *)
(* the sessions the cancelled agents are attached to.                       *)
(*                                                                          *)
(* Every operation is one call answering the transitions it made, in order  *)
(* (`last`), or refused with a code (`answer`) and changing nothing; the    *)
(* scheduler's schedule() runs inside the call. An agent's session is named *)
(* after the agent: the session of agent i is i itself (`ses_<id>` in the   *)
(* Rust check), so parents are HumanSessions \cup Ids.                      *)
(*                                                                          *)
(* Bound of the Rust check (core/tests/model_background_agents.rs): Users = *)
(* {ada, bob, cy}, interchangeable (a spawn runs for a user already seen or *)
(* the first one not seen yet), Ids = {a1, a2, a3, a4} spawned in order,    *)
(* HumanSessions = {ses_h}, limits STRICT (MaxConcurrent 2, MaxPerUser 1,   *)
(* MaxPerSession 1, MaxQueued 2, MaxDepth 2, MaxChildren 2) and FAIR (the   *)
(* same with MaxPerUser 2); every sequence of up to 6 calls from the empty  *)
(* shard, and of up to 4 from a seed (a1 spawned by ses_h, started,         *)
(* attached) so that grandchildren and TooDeep are reached. Each limit is   *)
(* about 20,000 states from the empty shard and 5,000 from the seed. Moves  *)
(* to every status are tried on every agent, valid or not, as are an        *)
(* unknown id and a taken one. Invariants and step properties carry the     *)
(* same names there. The test's mutants are edits inside the test harness   *)
(* (a state patched after the real call, a limit loosened, or the code      *)
(* before a fix re-implemented in the test): they show that each invariant  *)
(* is not vacuous for those corruptions, not that an arbitrary edit to      *)
(* core/src/background.rs is caught. For that see the mutation run of the   *)
(* core (cargo-mutants; README, "Mutation testing of the core").            *)
EXTENDS Naturals, FiniteSets, Sequences

CONSTANTS Users, Ids, HumanSessions,
          MaxConcurrent, MaxPerUser, MaxPerSession, MaxQueued, MaxDepth, MaxChildren

None == "none"          \* no parent, no session, not spawned
Sessions == HumanSessions \cup Ids
Terminal == {"completed", "failed", "cancelled"}
Live == {"starting", "running"}   \* holds a slot of the limits
Statuses == {"queued"} \cup Live \cup Terminal

VARIABLES ag,       \* [Ids -> [st, user, parent, depth, arrival, session]], st = None: not spawned
          spawned,  \* [Sessions -> Nat]: children each session ever spawned
          clock,    \* the last arrival number handed out
          \* History (ghost) variables, what the last call was and answered:
          call,     \* [op, arg]
          answer,   \* "ok" or the refusal's code
          last      \* the transitions answered, in order: a sequence of [id, from, to]
vars == <<ag, spawned, clock, call, answer, last>>

T(i, from, to) == [id |-> i, from |-> from, to |-> to]
Call(op, arg) == [op |-> op, arg |-> arg]

\* Over any shard `a` (so they also judge the intermediate states of a call):
Agents(a) == {i \in Ids : a[i].st # None}
Active(a) == {i \in Ids : a[i].st \in Live}
Queued(a) == {i \in Ids : a[i].st = "queued"}
Load(a, u) == Cardinality({i \in Active(a) : a[i].user = u})
ActiveKids(a, s) == Cardinality({i \in Active(a) : a[i].parent = s})
Kids(a, s) == {i \in Agents(a) : a[i].parent = s}
Fits(a, i) == /\ Cardinality(Active(a)) < MaxConcurrent
              /\ Load(a, a[i].user) < MaxPerUser
              /\ a[i].parent = None \/ ActiveKids(a, a[i].parent) < MaxPerSession
Waiting(a) == {i \in Queued(a) : Fits(a, i)}

\* The scheduler's order: the user with the fewest running agents first, then the earliest
\* arrival (arrivals are distinct, so the order is total).
Before(a, i, j) == \/ Load(a, a[i].user) < Load(a, a[j].user)
                   \/ Load(a, a[i].user) = Load(a, a[j].user) /\ a[i].arrival < a[j].arrival
Pick(a) == CHOOSE i \in Waiting(a) : \A j \in Waiting(a) \ {i} : Before(a, i, j)

\* Starts queued agents while capacity allows: <<shard, transitions>>.
RECURSIVE Schedule(_)
Schedule(a) == IF Waiting(a) = {} THEN <<a, <<>>>>
               ELSE LET i == Pick(a)
                        r == Schedule([a EXCEPT ![i].st = "starting"])
                    IN <<r[1], <<T(i, "queued", "starting")>> \o r[2]>>

\* Agents spawned, transitively, from the sessions S: through the sessions agents are
\* attached to, agents that have ended included.
RECURSIVE Desc(_, _)
Desc(a, S) == LET K == {i \in Agents(a) : a[i].parent \in S}
                  S2 == S \cup ({a[i].session : i \in K} \ {None})
              IN IF S2 = S THEN K ELSE Desc(a, S2)
DescOf(a, i) == IF a[i].session = None THEN {} ELSE Desc(a, {a[i].session})

RECURSIVE SeqOf(_)
SeqOf(S) == IF S = {} THEN <<>>
            ELSE LET x == CHOOSE x \in S : TRUE IN <<x>> \o SeqOf(S \ {x})

\* Cancels those of D that have not ended (no scheduling in between): <<shard, transitions>>.
Cancels(a, D) == LET L == SeqOf({i \in D : a[i].st \notin Terminal})
                 IN <<[i \in Ids |-> IF a[i].st \notin Terminal /\ i \in D
                                     THEN [a[i] EXCEPT !.st = "cancelled"] ELSE a[i]],
                      [k \in 1..Len(L) |-> T(L[k], a[L[k]].st, "cancelled")]>>

\* A call's own change r = <<shard, transitions>>, then schedule(): freed capacity is handed on.
Then(r) == LET s == Schedule(r[1]) IN ag' = s[1] /\ last' = r[2] \o s[2]
Done(c) == call' = c /\ answer' = "ok"
Refuse(c, code) == /\ call' = c /\ answer' = code /\ last' = <<>>
                   /\ UNCHANGED <<ag, spawned, clock>>

Init == /\ ag = [i \in Ids |-> [st |-> None, user |-> None, parent |-> None, depth |-> 0,
                                arrival |-> 0, session |-> None]]
        /\ spawned = [s \in Sessions |-> 0] /\ clock = 0
        /\ call = Call("init", None) /\ answer = "ok" /\ last = <<>>

\* Whether a new agent of user u spawned by par could start at once.
FitsNew(u, par) == /\ Cardinality(Active(ag)) < MaxConcurrent
                   /\ Load(ag, u) < MaxPerUser
                   /\ par = None \/ ActiveKids(ag, par) < MaxPerSession

\* SpawnRefusedPerLimits: the reasons a spawn is refused, checked in this order. A full
\* queue refuses only an agent that would have to wait.
SpawnRefusal(i, u, par, depth) ==
    IF ag[i].st # None THEN "invalid_input"
    ELSE IF depth > MaxDepth THEN "too_deep"
    ELSE IF par # None /\ spawned[par] >= MaxChildren THEN "too_many_children"
    ELSE IF Cardinality(Queued(ag)) >= MaxQueued /\ ~FitsNew(u, par) THEN "queue_full"
    ELSE "ok"

\* A spawn for user u by parent session par (None: through the API) whose agent is at depth pd.
Spawn(i, u, par, pd) ==
    LET c == Call("spawn", i)
        why == SpawnRefusal(i, u, par, pd + 1)
    IN IF why # "ok" THEN Refuse(c, why)
       ELSE /\ spawned' = IF par = None THEN spawned ELSE [spawned EXCEPT ![par] = @ + 1]
            /\ clock' = clock + 1
            /\ Then(<<[ag EXCEPT ![i] = [st |-> "queued", user |-> u, parent |-> par,
                                         depth |-> pd + 1, arrival |-> clock + 1,
                                         session |-> None]],
                      <<T(i, None, "queued")>>>>)
            /\ Done(c)

Cancel(i) ==
    LET c == Call("cancel", i) IN
    IF ag[i].st = None THEN Refuse(c, "agent_not_found")
    ELSE IF ag[i].st \in Terminal THEN Refuse(c, "invalid_transition")
    ELSE /\ Then(Cancels(ag, {i} \cup DescOf(ag, i)))
         /\ Done(c) /\ UNCHANGED <<spawned, clock>>

\* The session s ended: everything spawned from it is cancelled, also below children that ended.
CancelChildrenOf(s) == /\ Then(Cancels(ag, Desc(ag, {s})))
                       /\ Done(Call("cancel_children_of", s)) /\ UNCHANGED <<spawned, clock>>

CanMove(from, to) ==
    \/ <<from, to>> \in {<<"queued", "starting">>, <<"starting", "running">>,
                         <<"running", "completed">>}
    \/ from \in {"queued"} \cup Live /\ to \in {"failed", "cancelled"}

\* transition(i, to). Start is Move(i, "running"), Finish is Move(i, "completed" | "failed").
\* Starting a queued agent is the scheduler's move alone; cancelling is Cancel (it cascades).
Move(i, to) ==
    LET c == Call("move", <<i, to>>) IN
    IF ag[i].st = None THEN Refuse(c, "agent_not_found")
    ELSE IF ~CanMove(ag[i].st, to) \/ to = "starting" THEN Refuse(c, "invalid_transition")
    ELSE IF to = "cancelled" THEN Cancel(i)
    ELSE LET r == <<[ag EXCEPT ![i].st = to], <<T(i, ag[i].st, to)>>>>
         IN /\ IF to \in Terminal THEN Then(r) ELSE ag' = r[1] /\ last' = r[2]
            /\ Done(c) /\ UNCHANGED <<spawned, clock>>

\* The shell records the session an agent runs in while it starts or runs.
Attach(i) == IF ag[i].st = None THEN Refuse(Call("attach", i), "agent_not_found")
             ELSE /\ ag[i].st \in Live /\ ag[i].session = None
                  /\ ag' = [ag EXCEPT ![i].session = i] /\ last' = <<>>
                  /\ Done(Call("attach", i)) /\ UNCHANGED <<spawned, clock>>

Next == \/ \E i \in Ids, u \in Users :
              \/ Spawn(i, u, None, 0)
              \/ \E h \in HumanSessions : Spawn(i, u, h, 0)
              \/ \E p \in Ids : /\ ag[p].st = "running" /\ ag[p].session # None
                                /\ Spawn(i, u, ag[p].session, ag[p].depth)
        \/ \E i \in Ids, to \in Statuses : Move(i, to)
        \/ \E i \in Ids : Cancel(i) \/ Attach(i)
        \/ \E s \in Sessions : CancelChildrenOf(s)

Spec == Init /\ [][Next]_vars

\* Helpers of the step properties below.
\* The statuses of a shard, and replaying the answered transitions over them.
St(a) == [i \in Ids |-> a[i].st]
RECURSIVE Replay(_, _)
Replay(st, log) == IF log = <<>> THEN st
                   ELSE Replay([st EXCEPT ![Head(log).id] = Head(log).to], Tail(log))
\* The shard just before the k-th transition of the call.
At(k) == LET st == Replay(St(ag), SubSeq(last', 1, k - 1))
         IN [i \in Ids |-> [ag'[i] EXCEPT !.st = st[i]]]
\* A start passes over q (for c) when q fits and its user runs fewer agents, or q is an earlier one of the same user.
PassedOver(a, q, c) == \/ Load(a, a[q].user) < Load(a, a[c].user)
                       \/ a[q].user = a[c].user /\ a[q].arrival < a[c].arrival

\* Checked by core/tests/model_background_agents.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* ---- Invariants ----
ConcurrencyLimit == Cardinality(Active(ag)) <= MaxConcurrent
PerUserLimit == \A u \in Users : Load(ag, u) <= MaxPerUser
PerSessionLimit == \A s \in Sessions : ActiveKids(ag, s) <= MaxPerSession
QueueBound == Cardinality(Queued(ag)) <= MaxQueued
\* Within the limit, and one deeper than the agent whose session spawned it.
DepthBound == \A i \in Agents(ag) :
                 /\ ag[i].depth <= MaxDepth
                 /\ ag[i].depth = IF ag[i].parent \in Ids THEN ag[ag[i].parent].depth + 1 ELSE 1
\* Children per parent session within the limit, and counted exactly.
FanOutBound == \A s \in Sessions : spawned[s] = Cardinality(Kids(ag, s)) /\ spawned[s] <= MaxChildren
\* The scheduler leaves no queued agent that would fit.
WorkConserving == Waiting(ag) = {}
\* Nothing spawned (transitively) from a cancelled agent still waits or runs.
NoOrphanAfterCancel == \A i \in Agents(ag) :
                          ag[i].st = "cancelled" => \A d \in DescOf(ag, i) : ag[d].st \in Terminal

\* ---- Step properties ----
TerminalIsFinal == [][\A i \in Ids : ag[i].st \in Terminal => ag'[i].st = ag[i].st]_vars
\* Agents are never removed; who they run for, parent, depth and arrival never change; a session
\* is set once, by attach.
AgentsKept == [][\A i \in Agents(ag) :
                    /\ ag'[i].st # None
                    /\ <<ag'[i].user, ag'[i].parent, ag'[i].depth, ag'[i].arrival>>
                         = <<ag[i].user, ag[i].parent, ag[i].depth, ag[i].arrival>>
                    /\ ag'[i].session = ag[i].session \/ (call'.op = "attach" /\ ag[i].session = None)]_vars
\* Every transition answered is a valid one (a new agent appears queued).
ValidTransitions == [][\A k \in 1..Len(last') :
                          \/ last'[k].from = None /\ last'[k].to = "queued"
                          \/ last'[k].from # None /\ CanMove(last'[k].from, last'[k].to)]_vars
\* Replaying the answered transitions over the statuses before the call: each starts from the
\* status the agent has at that point, and the replay ends in the statuses after it.
TransitionsReportEveryChange ==
    [][/\ \A k \in 1..Len(last') : Replay(St(ag), SubSeq(last', 1, k - 1))[last'[k].id] = last'[k].from
       /\ Replay(St(ag), last') = St(ag')]_vars
\* Fair: a start passes over no waiting agent that fits the limits and whose user runs fewer
\* agents, nor an earlier one of the same user.
FairStarts == [][\A k \in 1..Len(last') :
                    last'[k].to = "starting" =>
                       \A q \in Waiting(At(k)) \ {last'[k].id} : ~PassedOver(At(k), q, last'[k].id)]_vars
\* A call never starts an agent that it also ends.
NoStartThenEnd == [][\A k, m \in 1..Len(last') :
                        (last'[k].to = "starting" /\ last'[m].id = last'[k].id) => last'[m].to \notin Terminal]_vars
\* After a cancel, nothing spawned (transitively) from the cancelled agent, or from the ended
\* session, waits or runs.
CancelCascades == [][answer' = "ok" =>
                       /\ call'.op = "cancel" => \A d \in DescOf(ag', call'.arg) : ag'[d].st \in Terminal
                       /\ call'.op = "cancel_children_of" =>
                             \A d \in Desc(ag', {call'.arg}) : ag'[d].st \in Terminal]_vars
RefusedChangesNothing == [][answer' # "ok" => UNCHANGED <<ag, spawned, clock>>]_vars
\* Nothing silently dropped: a spawn is refused (and adds nothing) or its agent is there,
\* answered queued first.
\* A spawn's answer is exactly SpawnRefusal's (true by construction of Spawn here; the Rust check
\* asserts that the scheduler's answers follow these rules, in this order).
SpawnRefusedPerLimits == [][\A i \in Ids, u \in Users, par \in Sessions \cup {None}, pd \in 0..MaxDepth :
                              Spawn(i, u, par, pd) => answer' = SpawnRefusal(i, u, par, pd + 1)]_vars
NothingSilentlyDropped == [][(call'.op = "spawn" /\ answer' = "ok") =>
                               /\ ag[call'.arg].st = None /\ ag'[call'.arg].st # None
                               /\ Len(last') > 0 /\ last'[1] = T(call'.arg, None, "queued")]_vars
=============================================================================
