---------------------------- MODULE HostedAgent ----------------------------
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

ExactlyOneOwner == {u \in Users : members[u] = "owner"} = {Owner}
ClientsBelongToMembers == \A c \in Clients : clients[c] # NoUser => IsMember(clients[c])
ClientLimit == \A u \in Users : Cardinality(ClientsOf(u)) <= MaxClients
LockHoldersAreMembers == \A r \in Resources : locks[r].holder # NoUser => IsMember(locks[r].holder)
\* Single writer: a live lock changes hands only through release, leave or expiry.
SingleWriter == [][\A r \in Resources :
                    (locks[r].holder # NoUser /\ locks'[r].holder \notin {NoUser, locks[r].holder})
                       => locks[r].exp <= now]_vars
EndedIsFinal == [][status = "ended" => status' = "ended"]_vars
=============================================================================
