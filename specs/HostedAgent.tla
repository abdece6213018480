---------------------------- MODULE HostedAgent ----------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_hosted_agent.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* Sessions, membership, client limits, edit locks and session status.       *)
(* Checked against the Rust state machine (core/src/session.rs) by            *)
(* core/tests/model_hosted_agent.rs: every invariant below is an assertion    *)
(* there, explored exhaustively over all action sequences up to a bound.      *)
(*                                                                            *)
(* Background agents spawned by people and by sessions (spawning, status,     *)
(* limits, cascading cancel) are the companion module BackgroundAgents.tla,   *)
(* checked against core/src/background.rs by                                  *)
(* core/tests/model_background_agents.rs.                                     *)
EXTENDS Naturals, FiniteSets

CONSTANTS Users, Owner, Clients, Resources, MaxClients, MaxTime, TTL, Timeout

VARIABLES members,   \* [Users -> {"none","member","owner"}]
          clients,   \* [Clients -> Users \cup {NoUser}]
          lastSeen,  \* [Clients -> Nat]
          locks,     \* [Resources -> [holder: Users \cup {NoUser}, exp: Nat]]
          status,    \* "active" | "ended"
          now

NoUser == "nobody"
vars == <<members, clients, lastSeen, locks, status, now>>

IsMember(u) == members[u] # "none"
ClientsOf(u) == {c \in Clients : clients[c] = u}

Init == /\ members = [u \in Users |-> IF u = Owner THEN "owner" ELSE "none"]
        /\ clients = [c \in Clients |-> NoUser]
        /\ lastSeen = [c \in Clients |-> 0]
        /\ locks = [r \in Resources |-> [holder |-> NoUser, exp |-> 0]]
        /\ status = "active"
        /\ now = 0

Join(u) == /\ status = "active" /\ ~IsMember(u)
           /\ members' = [members EXCEPT ![u] = "member"]
           /\ UNCHANGED <<clients, lastSeen, locks, status, now>>

Leave(u) == /\ members[u] = "member"
            /\ members' = [members EXCEPT ![u] = "none"]
            /\ clients' = [c \in Clients |-> IF clients[c] = u THEN NoUser ELSE clients[c]]
            /\ locks' = [r \in Resources |-> IF locks[r].holder = u
                                             THEN [holder |-> NoUser, exp |-> 0] ELSE locks[r]]
            /\ UNCHANGED <<lastSeen, status, now>>

Connect(u, c) == /\ IsMember(u)
                 /\ clients[c] \in {NoUser, u}
                 /\ clients[c] = u \/ Cardinality(ClientsOf(u)) < MaxClients
                 /\ clients' = [clients EXCEPT ![c] = u]
                 /\ lastSeen' = [lastSeen EXCEPT ![c] = now]
                 /\ UNCHANGED <<members, locks, status, now>>

Disconnect(c) == /\ clients[c] # NoUser
                 /\ clients' = [clients EXCEPT ![c] = NoUser]
                 /\ UNCHANGED <<members, lastSeen, locks, status, now>>

Acquire(u, r) == /\ status = "active" /\ IsMember(u)
                 /\ locks[r].holder \in {NoUser, u} \/ locks[r].exp <= now
                 /\ locks' = [locks EXCEPT ![r] = [holder |-> u, exp |-> now + TTL]]
                 /\ UNCHANGED <<members, clients, lastSeen, status, now>>

Release(u, r) == /\ IsMember(u)
                 /\ locks[r].holder # NoUser
                 /\ locks[r].holder = u \/ members[u] = "owner"
                 /\ locks' = [locks EXCEPT ![r] = [holder |-> NoUser, exp |-> 0]]
                 /\ UNCHANGED <<members, clients, lastSeen, status, now>>

Sweep == /\ clients' = [c \in Clients |-> IF lastSeen[c] + Timeout <= now THEN NoUser ELSE clients[c]]
         /\ locks' = [r \in Resources |-> IF locks[r].holder # NoUser /\ locks[r].exp <= now
                                          THEN [holder |-> NoUser, exp |-> 0] ELSE locks[r]]
         /\ UNCHANGED <<members, lastSeen, status, now>>

End == /\ status = "active" /\ status' = "ended"
       /\ UNCHANGED <<members, clients, lastSeen, locks, now>>

Tick == /\ now < MaxTime /\ now' = now + 1
        /\ UNCHANGED <<members, clients, lastSeen, locks, status>>

Next == \/ Tick \/ Sweep \/ End
        \/ \E u \in Users : Join(u) \/ Leave(u)
        \/ \E u \in Users, c \in Clients : Connect(u, c)
        \/ \E c \in Clients : Disconnect(c)
        \/ \E u \in Users, r \in Resources : Acquire(u, r) \/ Release(u, r)

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_hosted_agent.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

ExactlyOneOwner == {u \in Users : members[u] = "owner"} = {Owner}
ClientsBelongToMembers == \A c \in Clients : clients[c] # NoUser => IsMember(clients[c])
ClientLimit == \A u \in Users : Cardinality(ClientsOf(u)) <= MaxClients
LockHoldersAreMembers == \A r \in Resources : locks[r].holder # NoUser => IsMember(locks[r].holder)
\* Single writer: a live lock changes hands only through release, leave or expiry.
SingleWriter == [][/\ \A r \in Resources :
                       (locks[r].holder # NoUser /\ locks'[r].holder \notin {NoUser, locks[r].holder})
                          => locks[r].exp <= now
                    \* A release frees the lock; whoever leaves holds nothing afterwards.
                    /\ \A u \in Users, r \in Resources : Release(u, r) => locks'[r].holder = NoUser
                    /\ \A u \in Users : Leave(u) => \A r \in Resources : locks'[r].holder # u]_vars
EndedIsFinal == [][status = "ended" => status' = "ended"]_vars
\* An ended session takes no new member and no new lock.
EndedRefusesWork == [][status = "ended" => \A u \in Users : ~Join(u) /\ \A r \in Resources : ~Acquire(u, r)]_vars
\* A sweep at time now frees every lock whose lease ended by now and drops every client silent for
\* the whole timeout, and nothing else.
SweepClears == [][Sweep => /\ \A r \in Resources :
                                locks'[r].holder # NoUser <=> (locks[r].holder # NoUser /\ locks[r].exp > now)
                           /\ \A c \in Clients :
                                clients'[c] # NoUser <=> (clients[c] # NoUser /\ lastSeen[c] + Timeout > now)]_vars
\* Rust only: EventsMirrorLocks, EventsMirrorMembers. (The locks and members rebuilt from the
\* emitted events alone equal the state: the spec has no event log, the Rust check does.)
=============================================================================
