\* WarmPool: the warm pool of one repository (core/src/pool.rs), checked by core/tests/model_warm_pool.rs.
------------------------------ MODULE WarmPool ------------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_warm_pool.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* Ready sandboxes from the latest image, claimed by sessions at once,        *)
(* refilled by (possibly duplicated) alarms and drained when the image       *)
(* changes or the pool shrinks. The shell records a sandbox as requested     *)
(* before it asks the provider, so a repeated alarm plans nothing twice.     *)
(*                                                                           *)
(* Bound of the Rust check (core/tests/model_warm_pool.rs): Sessions =       *)
(* {ses_a, ses_b}, Images = {img_1, img_2} starting from no image, targets   *)
(* 0..2 starting at 1, at most 4 sandbox ids, clock 0..2 with Timeout = 1,  *)
(* every sequence of up to 8                                                 *)
(* actions (keys are bounded by the depth). Stale and duplicated provider    *)
(* callbacks are explored for every key ever planned. History variables     *)
(* below are the test's ghost state; invariants and step properties carry    *)
(* the same names there.                                                     *)
(*                                                                           *)
(* The provider's side is modelled apart from the pool: a create is asked,   *)
(* carried out by the provider (ProviderCreated), and only then recorded by  *)
(* the pool (Recorded); the object may crash in between (Crash), losing the  *)
(* answer. Entries pending longer than Timeout (requested, booting, or       *)
(* drained before their answer) are given up by Expire: booting ones drain,  *)
(* unrecorded ones are dropped and their key is swept (every provider        *)
(* sandbox labelled with it terminated). Assumed of the provider: a create   *)
(* not carried out within Timeout of its request never is.                   *)
EXTENDS Naturals, FiniteSets

CONSTANTS Sessions, Images, MaxTarget, MaxKeys, Sandboxes, MaxTime, Timeout

NoImage == "no_image"          \* a plain clone: the repository has no image yet
NoSbx == "no_sandbox"          \* requested, the provider has not answered yet
NoSession == "no_session"
Keys == 1..MaxKeys             \* stable names chosen when a sandbox is requested
Idle == {"requested", "booting", "ready"}
Slots == Idle \cup {"draining", "gone"}   \* "gone": no entry (never planned, claimed or removed)

VARIABLES target,     \* how many idle sandboxes to keep
          image,      \* the image new sandboxes come from
          slot,       \* [Keys -> Slots]
          sbx,        \* [Keys -> Sandboxes \cup {NoSbx}]
          img,        \* [Keys -> Images \cup {NoImage}]
          nextKey,    \* keys 1..nextKey have been planned
          claims,     \* [Sessions -> Sandboxes \cup {NoSbx}]: the sandbox handed to each session
          since,      \* [Keys -> Nat]: when each key was requested
          sweeps,     \* keys given up before their create was recorded: a sweep is owed
          now,        \* the clock
          \* The provider (ghost):
          asked,      \* keys whose create is on its way to the provider
          askedAt,    \* [Keys -> Nat]: when it was asked
          answer,     \* [Keys -> Sandboxes \cup {NoSbx}]: the provider's answer on its way back
          provKey,    \* [Sandboxes -> Keys \cup {0}]: the key each sandbox was created for (0: none yet)
          alive,      \* sandboxes running at the provider
          \* History (ghost) variables:
          created,    \* sandboxes the provider created
          sbxImage,   \* [Sandboxes -> Images \cup {NoImage}]: image of the key each was created for
          handed,     \* [Sandboxes -> Sessions \cup {NoSession}]: to whom each was ever handed out
          released,   \* sandboxes whose entry was removed as lost or drained
          terminated, \* sandboxes the pool asked the shell to terminate
          drainedSbx, \* sandboxes that were ever in a draining entry
          shared,     \* a claim handed out a sandbox already handed to another session
          stale       \* a claim handed out a sandbox not of the image current at claim time

pool == <<target, image, slot, sbx, img, nextKey, claims>>
ghost == <<created, sbxImage, handed, released, terminated, drainedSbx, shared, stale>>
timing == <<since, sweeps, now>>
prov == <<asked, askedAt, answer, provKey, alive>>
vars == <<pool, ghost, timing, prov>>

IdleKeys(sl) == {k \in Keys : sl[k] \in Idle}
Deficit(sl, tg) == IF Cardinality(IdleKeys(sl)) < tg THEN tg - Cardinality(IdleKeys(sl)) ELSE 0
Warm == {k \in Keys : slot[k] = "ready" /\ img[k] = image}
SandboxesOf(D) == {sbx[k] : k \in D} \ {NoSbx}
PendingDrains == {<<k, sbx[k]>> : k \in {j \in Keys : slot[j] = "draining" /\ sbx[j] # NoSbx}}
\* Waiting on the provider: requested, booting, or drained before its create was answered.
Pending(k) == slot[k] \in {"requested", "booting"} \/ (slot[k] = "draining" /\ sbx[k] = NoSbx)
PendingKeys == {k \in Keys : Pending(k)}
\* The pool's next deadline (for the alarm): the oldest pending entry's timeout.
NextDeadline == {d \in {since[k] + Timeout : k \in PendingKeys} : \A j \in PendingKeys : d <= since[j] + Timeout}

Init == /\ target \in 0..MaxTarget /\ image = NoImage
        /\ slot = [k \in Keys |-> "gone"] /\ sbx = [k \in Keys |-> NoSbx]
        /\ img = [k \in Keys |-> NoImage] /\ nextKey = 0
        /\ claims = [s \in Sessions |-> NoSbx]
        /\ created = {} /\ sbxImage = [s \in Sandboxes |-> NoImage]
        /\ handed = [s \in Sandboxes |-> NoSession]
        /\ released = {} /\ terminated = {} /\ drainedSbx = {}
        /\ shared = FALSE /\ stale = FALSE
        /\ since = [k \in Keys |-> 0] /\ sweeps = {} /\ now = 0
        /\ asked = {} /\ askedAt = [k \in Keys |-> 0] /\ answer = [k \in Keys |-> NoSbx]
        /\ provKey = [s \in Sandboxes |-> 0] /\ alive = {}

\* Plans the missing idle sandboxes, each recorded as requested before any I/O.
Refill == LET n == Deficit(slot, target)
              New == {k \in Keys : nextKey < k /\ k <= nextKey + n}
          IN /\ n > 0 /\ nextKey + n <= MaxKeys
             /\ slot' = [k \in Keys |-> IF k \in New THEN "requested" ELSE slot[k]]
             /\ img' = [k \in Keys |-> IF k \in New THEN image ELSE img[k]]
             /\ nextKey' = nextKey + n
             /\ since' = [k \in Keys |-> IF k \in New THEN now ELSE since[k]]
             /\ asked' = asked \cup New
             /\ askedAt' = [k \in Keys |-> IF k \in New THEN now ELSE askedAt[k]]
             /\ UNCHANGED <<target, image, sbx, claims, ghost, sweeps, now, answer, provKey, alive>>

\* The provider carries out key k's create as sandbox s (a fresh id); the answer is on its way.
ProviderCreated(k, s) == /\ k \in asked /\ now < askedAt[k] + Timeout /\ provKey[s] = 0
                         /\ asked' = asked \ {k} /\ answer' = [answer EXCEPT ![k] = s]
                         /\ provKey' = [provKey EXCEPT ![s] = k] /\ alive' = alive \cup {s}
                         /\ UNCHANGED <<pool, ghost, timing, askedAt>>

\* The provider refused the create: the pool forgets the key.
CreateRefused(k) == /\ k \in asked /\ asked' = asked \ {k}
                    /\ slot' = [slot EXCEPT ![k] = "gone"]
                    /\ UNCHANGED <<target, image, sbx, img, nextKey, claims, ghost, timing>>
                    /\ UNCHANGED <<askedAt, answer, provKey, alive>>

\* The object was evicted or crashed while k's create was out: the request or the answer is
\* lost and nothing records it (a sandbox the provider created keeps running).
Crash(k) == /\ k \in asked \/ answer[k] # NoSbx
            /\ asked' = asked \ {k} /\ answer' = [answer EXCEPT ![k] = NoSbx]
            /\ UNCHANGED <<pool, ghost, timing, askedAt, provKey, alive>>

\* The answer reaches the pool. A requested key boots; a key drained while its create was in
\* flight keeps draining and its sandbox is terminated; an unknown (given-up) key's sandbox too.
Recorded(k) == LET s == answer[k] IN
               /\ s # NoSbx /\ answer' = [answer EXCEPT ![k] = NoSbx]
               /\ IF slot[k] = "requested" \/ (slot[k] = "draining" /\ sbx[k] = NoSbx)
                  THEN /\ sbx' = [sbx EXCEPT ![k] = s]
                       /\ slot' = IF slot[k] = "requested" THEN [slot EXCEPT ![k] = "booting"] ELSE slot
                       /\ created' = created \cup {s}
                       /\ sbxImage' = [sbxImage EXCEPT ![s] = img[k]]
                  ELSE UNCHANGED <<sbx, slot, created, sbxImage>>
               /\ IF slot[k] = "requested"
                  THEN UNCHANGED <<alive, terminated, drainedSbx>>
                  ELSE /\ alive' = alive \ {s} /\ terminated' = terminated \cup {s}
                       /\ drainedSbx' = IF slot[k] = "draining" THEN drainedSbx \cup {s} ELSE drainedSbx
               /\ UNCHANGED <<target, image, img, nextKey, claims>>
               /\ UNCHANGED <<handed, released, shared, stale, timing, asked, askedAt, provKey>>

Booted(k) == /\ slot[k] = "booting" /\ slot' = [slot EXCEPT ![k] = "ready"]
             /\ UNCHANGED <<target, image, sbx, img, nextKey, claims, ghost, timing, prov>>

Remove(k) == /\ slot' = [slot EXCEPT ![k] = "gone"] /\ sbx' = [sbx EXCEPT ![k] = NoSbx]
             /\ released' = released \cup SandboxesOf({k})
             /\ alive' = alive \ SandboxesOf({k})
             /\ UNCHANGED <<timing, asked, askedAt, answer, provKey>>
             /\ UNCHANGED <<target, image, img, nextKey, claims>>
             /\ UNCHANGED <<created, sbxImage, handed, terminated, drainedSbx, shared, stale>>

\* A recorded sandbox died while pooled (a refused create is CreateRefused).
Lost(k) == slot[k] # "gone" /\ sbx[k] # NoSbx /\ Remove(k)
\* A draining sandbox's terminate was confirmed.
Drained(k) == slot[k] = "draining" /\ sbx[k] # NoSbx /\ Remove(k)

\* Entries pending longer than Timeout are given up: booting ones drain (a terminate is owed),
\* unrecorded ones are dropped and their key is owed a sweep.
Expire == LET Stale == {k \in PendingKeys : since[k] + Timeout <= now}
              Rec == {k \in Stale : sbx[k] # NoSbx}
          IN /\ slot' = [k \in Keys |-> IF k \in Rec THEN "draining"
                                        ELSE IF k \in Stale THEN "gone" ELSE slot[k]]
             /\ sweeps' = sweeps \cup (Stale \ Rec)
             /\ terminated' = terminated \cup SandboxesOf(Rec)
             /\ drainedSbx' = drainedSbx \cup SandboxesOf(Rec)
             /\ UNCHANGED <<target, image, sbx, img, nextKey, claims, since, now, prov>>
             /\ UNCHANGED <<created, sbxImage, handed, released, shared, stale>>

\* Every provider sandbox labelled with the swept key has been terminated.
Swept(k) == /\ k \in sweeps /\ sweeps' = sweeps \ {k}
            /\ alive' = alive \ {s \in Sandboxes : provKey[s] = k}
            /\ UNCHANGED <<pool, ghost, since, now, asked, askedAt, answer, provKey>>

Tick == now < MaxTime /\ now' = now + 1 /\ UNCHANGED <<pool, ghost, since, sweeps, prov>>

\* A session without a sandbox takes a ready one of the current image; asking again answers
\* the same sandbox (a stutter); with nothing warm the caller starts one cold (a stutter).
Claim(ses) == /\ claims[ses] = NoSbx
              /\ \E k \in Warm :
                   LET s == sbx[k] IN
                   /\ slot' = [slot EXCEPT ![k] = "gone"]
                   /\ sbx' = [sbx EXCEPT ![k] = NoSbx]
                   /\ claims' = [claims EXCEPT ![ses] = s]
                   /\ shared' = (shared \/ handed[s] \notin {NoSession, ses})
                   /\ handed' = [handed EXCEPT ![s] = ses]
                   /\ stale' = (stale \/ sbxImage[s] # image)
              /\ UNCHANGED <<target, image, img, nextKey, timing, prov>>
              /\ UNCHANGED <<created, sbxImage, released, terminated, drainedSbx>>

\* The handover failed: the session may claim again; the sandbox is not reused.
Unclaim(ses) == /\ claims[ses] # NoSbx /\ claims' = [claims EXCEPT ![ses] = NoSbx]
                /\ UNCHANGED <<target, image, slot, sbx, img, nextKey, ghost, timing, prov>>

Drain(D) == /\ slot' = [k \in Keys |-> IF k \in D THEN "draining" ELSE slot[k]]
            /\ terminated' = terminated \cup SandboxesOf(D)
            /\ drainedSbx' = drainedSbx \cup SandboxesOf(D)
            /\ UNCHANGED <<sbx, img, nextKey, claims, timing, prov>>
            /\ UNCHANGED <<created, sbxImage, handed, released, shared, stale>>

\* A new image is ready: idle sandboxes of any other image drain.
NewImage(i) == /\ image' = i
               /\ Drain({k \in Keys : slot[k] \in Idle /\ img[k] # i})
               /\ UNCHANGED target

\* A new size: shrinking drains the surplus, requested before booting before ready.
Rank(sl) == CASE sl = "requested" -> 0 [] sl = "booting" -> 1 [] OTHER -> 2
Resize(n) == LET I == IdleKeys(slot)
                 m == IF Cardinality(I) > n THEN Cardinality(I) - n ELSE 0
             IN \E D \in SUBSET I :
                  /\ Cardinality(D) = m
                  /\ \A d \in D, k \in I \ D : Rank(slot[d]) <= Rank(slot[k])
                  /\ target' = n
                  /\ Drain(D)
                  /\ UNCHANGED image

Next == \/ Refill \/ Expire \/ Tick
        \/ \E k \in Keys, s \in Sandboxes : ProviderCreated(k, s)
        \/ \E k \in Keys : CreateRefused(k) \/ Crash(k) \/ Recorded(k) \/ Swept(k)
        \/ \E k \in Keys : Booted(k) \/ Lost(k) \/ Drained(k)
        \/ \E ses \in Sessions : Claim(ses) \/ Unclaim(ses)
        \/ \E i \in Images : NewImage(i)
        \/ \E n \in 0..MaxTarget : Resize(n)

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_warm_pool.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* A sandbox handed out is never handed to another session, even after an unclaim.
NeverTwoSessionsOnOneSandbox ==
    /\ ~shared
    /\ \A a, b \in Sessions : (a # b /\ claims[a] # NoSbx) => claims[a] # claims[b]
    /\ \A ses \in Sessions : claims[ses] # NoSbx =>
          /\ handed[claims[ses]] = ses
          /\ \A k \in Keys : sbx[k] # claims[ses]
\* Idle (non-draining) entries never exceed the target.
PoolBound == Cardinality(IdleKeys(slot)) <= target
\* Every claim hands out a sandbox of the image current at claim time; idle ones are all current.
NoOldImageHandedOut == ~stale /\ \A k \in IdleKeys(slot) : img[k] = image
\* A sandbox that was ever draining (or told to terminate) is never handed out.
DrainedNeverClaimed == \A s \in Sandboxes : handed[s] # NoSession => s \notin drainedSbx \cup terminated
\* With a ready sandbox of the current image pooled, a session without one is never sent cold.
ClaimTakesWarm == \A ses \in Sessions : (claims[ses] = NoSbx /\ Warm # {}) => ENABLED Claim(ses)
\* The terminate of every existing draining sandbox is owed until it is drained (safe to repeat).
DrainsOwed == \A k \in Keys : (slot[k] = "draining" /\ sbx[k] # NoSbx) => <<k, sbx[k]>> \in PendingDrains
\* Every created sandbox is pooled, handed out, or was removed as terminated or dead.
NoSandboxLeaked ==
    /\ \A s \in created : (\E k \in Keys : sbx[k] = s) \/ handed[s] # NoSession \/ s \in released
    /\ \A k \in Keys : slot[k] = "requested" => sbx[k] = NoSbx
    /\ \A k \in Keys : slot[k] \in {"booting", "ready"} => sbx[k] # NoSbx

\* Idempotent alarms: a refill immediately repeated plans nothing.
RefillIdempotent == [][Refill => Deficit(slot', target') = 0]_vars
\* Refills plan only keys never planned before.
RefillPlansFreshKeys == [][Refill => \A k \in Keys : (slot'[k] = "requested" /\ slot[k] # "requested") => k > nextKey]_vars
\* A draining sandbox never becomes requested, booting or ready (claimable) again.
DrainingIsFinal == [][\A k \in Keys : slot[k] = "draining" => slot'[k] \in {"draining", "gone"}]_vars
\* A key once removed never comes back.
RemovedKeysStayRemoved == [][\A k \in Keys : (k <= nextKey /\ slot[k] = "gone") => slot'[k] = "gone"]_vars
\* Every sandbox running at the provider is recorded by an entry, handed out, on its way back in
\* an answer, or stands for an entry whose create was never recorded: that entry is still
\* pending (it times out: PendingTimesOut) or its key is owed a sweep.
ProviderSandboxOwned == \A s \in alive :
                          \/ \E k \in Keys : slot[k] # "gone" /\ sbx[k] = s
                          \/ handed[s] # NoSession
                          \/ answer[provKey[s]] = s
                          \/ slot[provKey[s]] \in {"requested", "draining"} /\ sbx[provKey[s]] = NoSbx
                          \/ provKey[s] \in sweeps
\* The pool's next deadline is due no later than any pending entry's timeout.
PendingTimesOut == \A k \in PendingKeys : \E d \in NextDeadline : d <= since[k] + Timeout
\* After an expiry nothing pending is older than Timeout; what was given up unrecorded is owed a
\* sweep, a given-up booting sandbox a terminate (its entry drains).
ExpireGivesUpStale == [][Expire => /\ \A k \in Keys : Pending(k)' => since'[k] + Timeout > now
                                   /\ \A k \in {j \in PendingKeys : since[j] + Timeout <= now} :
                                        IF sbx[k] = NoSbx THEN k \in sweeps'
                                        ELSE sbx[k] \in terminated' /\ slot'[k] = "draining"]_vars
=============================================================================
