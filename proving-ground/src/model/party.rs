//! The parties' steps in the model: each carries out what the product's pure rules say, one
//! request or one answer per step, so that every other party, Xero, a fault, a crash or the
//! clock may move in between.

use std::time::{Duration, SystemTime};

use stateright::Model as _;
use xero_operator::protocol::backoff::{ACROSS_CLAIMS, XERO_RETRY};
use xero_operator::protocol::decide::Role;
use xero_operator::protocol::format::{self as f, annotations_patch, salvage_patch};
use xero_operator::protocol::retry::{Next, after_failed_call};
use xero_operator::protocol::round::{
    self, Action, AfterError, Facts, Hold, InvalidGrant, RELEASE_TRIES, ReleaseConflict,
    StoreConflict,
};
use xero_operator::redact::Sensitive;
use xero_operator::xero::XeroError;

use super::world::{Answer, StoredSecret, TICK, Written};
use super::{ProtocolModel, State};

/// One party (the controller or a consumer).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Party {
    pub pc: Pc,
    /// How many times it restarted: a restarted process claims under a new identity (the
    /// product's identities are per process).
    pub incarnation: u8,
}

/// Where a party is in its refresh.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Pc {
    /// Between rounds (a round may start at any time: a `get`, a reconcile, a wait ending).
    Idle,
    /// Holds the claim it made on `claimed` (the Secret as the claim left it), until
    /// `lease_end` (ms on its clock); `calls` made so far.
    Holding {
        claimed: StoredSecret,
        lease_end: u64,
        calls: u8,
    },
    /// Waiting on Xero: presented refresh token generation `presented`, sent at `sent` (ms on
    /// its clock); the call is cut at tick `cut_at` (never, if `None`); `answer` once Xero
    /// answered (or the call was cut).
    Calling {
        claimed: StoredSecret,
        lease_end: u64,
        calls: u8,
        presented: u8,
        sent: u64,
        cut_at: Option<u8>,
        answer: Option<Answer>,
    },
    /// Storing generation `generation` (its access token living `expires_in` s from the
    /// answer), writing on version `version`; `salvage`: only the refresh token.
    Storing {
        claimed: StoredSecret,
        generation: u8,
        expires_in: u64,
        sent: u64,
        received: u64,
        version: u32,
        salvage: bool,
        /// The last write failed (an API fault): the retry waits for the clock.
        stalled: bool,
    },
    /// Releasing the claim (`mine`) or writing `markers` only, on version `version`.
    Releasing {
        version: u32,
        markers: Vec<(&'static str, Option<String>)>,
        mine: bool,
        tries: u32,
    },
}

impl Party {
    /// Whether this party has a step to take that takes no time in reality (a local step, a
    /// request to the API server): the clock waits for it. A call to Xero (its request or its
    /// answer on the way), a retry after an API fault and an idle party let the clock move.
    pub fn urgent(&self) -> bool {
        match &self.pc {
            Pc::Idle => false,
            // An answer in flight takes time too (until the call is cut).
            Pc::Calling { .. } => false,
            Pc::Storing { stalled, .. } => !stalled,
            Pc::Holding { .. } | Pc::Releasing { .. } => true,
        }
    }

    /// Whether this party holds an answer carrying refresh token generation `g` that it has
    /// yet to store.
    pub fn carries(&self, g: u8) -> bool {
        match &self.pc {
            Pc::Calling {
                answer: Some(Answer::Tokens { generation, .. }),
                ..
            } => *generation == g,
            Pc::Storing { generation, .. } => *generation == g,
            _ => false,
        }
    }
}

/// What Xero does with a call.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Acts on it and answers.
    Answers,
    /// 503, not acted on.
    Unavailable,
    /// 429 (retry after a tick), not acted on.
    RateLimited,
    /// `invalid_client`: the app's credentials refused.
    InvalidClient,
    /// Acts on it; the answer never arrives.
    AnswerLost,
}

/// How the API server handles a write (the faults are counted).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Api {
    Answers,
    /// Applies it, but the answer is lost.
    AnswerLost,
    /// Fails it (an outage): the writer retries later.
    Fails,
}

/// A step of the model.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Act {
    /// The clock advances one tick.
    Tick,
    /// Party `n` starts a round on the API server's copy of the Secret.
    Round(usize),
    /// Consumer `n` starts a round on its follower's copy, one version behind.
    RoundOnFollower(usize),
    /// Party `n`, holding a claim, calls Xero (or gives the claim back).
    Call(usize),
    /// Xero handles party `n`'s call.
    Xero(usize, Outcome),
    /// Party `n` acts on Xero's answer.
    Receive(usize),
    /// Party `n` writes what it stores, and the API server answers `api`.
    Store { party: usize, api: Api },
    /// Party `n` writes its release.
    Release(usize),
    /// Party `n` crashes (it restarts idle; whatever it held stays in the Secret).
    Crash(usize),
}

impl ProtocolModel {
    /// Every step the parties and Xero can take in `s` (`fair`: no faults, no crashes, no
    /// follower reads: the schedule of [`ProtocolModel::recovers`]).
    pub(super) fn party_actions(&self, s: &State, actions: &mut Vec<Act>, fair: bool) {
        for (n, party) in s.parties.iter().enumerate() {
            match &party.pc {
                Pc::Idle => {
                    actions.push(Act::Round(n));
                    if !fair && self.config.roles[n] == Role::Consumer && s.previous.is_some() {
                        actions.push(Act::RoundOnFollower(n));
                    }
                }
                Pc::Holding { .. } => actions.push(Act::Call(n)),
                Pc::Calling { answer: None, .. } => {
                    actions.push(Act::Xero(n, Outcome::Answers));
                    if !fair && s.faults_left > 0 {
                        for o in [
                            Outcome::Unavailable,
                            Outcome::RateLimited,
                            Outcome::InvalidClient,
                            Outcome::AnswerLost,
                        ] {
                            actions.push(Act::Xero(n, o));
                        }
                    }
                }
                Pc::Calling { .. } => actions.push(Act::Receive(n)),
                Pc::Storing { .. } => {
                    actions.push(Act::Store {
                        party: n,
                        api: Api::Answers,
                    });
                    if !fair && s.faults_left > 0 {
                        for api in [Api::AnswerLost, Api::Fails] {
                            actions.push(Act::Store { party: n, api });
                        }
                    }
                }
                Pc::Releasing { .. } => actions.push(Act::Release(n)),
            }
            if !fair && s.crashes_left > 0 && party.pc != Pc::Idle {
                actions.push(Act::Crash(n));
            }
        }
    }

    /// The state after `act`, or `None` if it cannot happen.
    pub(super) fn step(&self, s: &State, act: Act) -> Option<State> {
        let mut s = s.clone();
        match act {
            Act::Tick => {
                if s.parties.iter().any(Party::urgent) {
                    return None;
                }
                s.time += 1;
                for party in &mut s.parties {
                    if let Pc::Calling { cut_at, answer, .. } = &mut party.pc
                        && cut_at.is_some_and(|cut| cut <= s.time)
                        && !matches!(answer, Some(Answer::NoAnswer))
                    {
                        // Cut: an answer Xero already gave is lost with it.
                        if matches!(answer, Some(Answer::Tokens { .. })) {
                            s.disrupted = true;
                        }
                        *answer = Some(Answer::NoAnswer);
                    }
                    if let Pc::Storing { stalled, .. } = &mut party.pc {
                        *stalled = false;
                    }
                }
            }
            Act::Round(n) => self.round(&mut s, n, false),
            Act::RoundOnFollower(n) => self.round(&mut s, n, true),
            Act::Call(n) => self.call(&mut s, n),
            Act::Xero(n, outcome) => {
                let Pc::Calling {
                    presented, answer, ..
                } = &mut s.parties[n].pc
                else {
                    return None;
                };
                if outcome != Outcome::Answers {
                    s.faults_left = s.faults_left.checked_sub(1)?;
                }
                *answer = Some(match outcome {
                    Outcome::Answers => s.xero.refresh(*presented, s.time, self.config.life_ticks),
                    Outcome::Unavailable => Answer::Unavailable,
                    Outcome::RateLimited => Answer::RateLimited,
                    Outcome::InvalidClient => {
                        s.refused_for_good = true;
                        Answer::InvalidClient
                    }
                    Outcome::AnswerLost => {
                        s.xero.refresh(*presented, s.time, self.config.life_ticks);
                        s.disrupted = true;
                        Answer::NoAnswer
                    }
                });
            }
            Act::Receive(n) => self.receive(&mut s, n),
            Act::Store { party, api } => {
                if api != Api::Answers {
                    s.faults_left = s.faults_left.checked_sub(1)?;
                    // Slower than the claim, maybe: another party may take over and replay.
                    s.disrupted = true;
                }
                self.store(&mut s, party, api);
            }
            Act::Release(n) => self.release(&mut s, n),
            Act::Crash(n) => {
                s.crashes_left = s.crashes_left.checked_sub(1)?;
                s.parties[n].pc = Pc::Idle;
                s.parties[n].incarnation += 1;
                s.disrupted = true;
            }
        }
        Some(s)
    }

    fn now(&self, s: &State, n: usize) -> SystemTime {
        self.clock(n, s.time)
    }

    /// A write to the API server: the Secret before it becomes what a lagging follower shows.
    fn write(s: &mut State, patch: &serde_json::Value) -> Written {
        let before = s.secret.clone();
        let written = s.secret.apply(patch);
        if written == Written::Landed {
            s.previous = Some(before);
        }
        written
    }

    fn round(&self, s: &mut State, n: usize, followed: bool) {
        let me = self.identity(s, n);
        let now = self.now(s, n);
        let read = if followed {
            s.previous.clone().unwrap_or_else(|| s.secret.clone())
        } else {
            s.secret.clone()
        };
        let rec = read.record();
        let facts = Facts {
            rec: &rec,
            now,
            me: &me,
            role: self.config.roles[n],
            followed,
            left: Duration::from_secs(60),
            max_wait: Duration::from_secs(60),
        };
        match (self.rules.next)(&facts) {
            // The controller's token goes into its status, not to a workload (the status's own
            // rule: Ready only while the token is usable, is the controller's tests' to check).
            Action::Hand if self.config.roles[n] == Role::Consumer => self.hand(s, &rec),
            Action::Hand => {}
            Action::AskServer | Action::Wait(_) | Action::Fail(_) => {}
            Action::Claim { lease_end, .. } => {
                // Markers are honoured at the claim, the write every refresher makes first.
                if self.forbidden(&rec, s.time) {
                    s.marker_ignored = true;
                }
                let patch = (self.rules.claim_patch)(&read.version.to_string(), &me, lease_end);
                if Self::write(s, &patch) == Written::Landed {
                    s.parties[n].pc = Pc::Holding {
                        claimed: s.secret.clone(),
                        lease_end: millis(lease_end),
                        calls: 0,
                    };
                }
            }
            Action::Call { lease_end } => {
                s.parties[n].pc = Pc::Holding {
                    claimed: read,
                    lease_end: millis(lease_end),
                    calls: 0,
                };
            }
        }
    }

    /// A party hands out the access token of `rec`: it must really be usable now.
    fn hand(&self, s: &mut State, rec: &f::TokenRecord) {
        let generation = rec
            .access_token
            .as_ref()
            .and_then(|at| at.expose().strip_prefix("at")?.parse::<u8>().ok());
        if let Some(g) = generation
            && s.xero.expiry_tick(g) <= s.time
        {
            s.handed_expired = true;
        }
    }

    fn call(&self, s: &mut State, n: usize) {
        let Pc::Holding {
            claimed,
            lease_end,
            calls,
        } = s.parties[n].pc.clone()
        else {
            return;
        };
        let now = self.now(s, n);
        let rec = claimed.record();
        match round::hold(&rec, now, self.config.roles[n], Duration::ZERO) {
            Hold::CallNow => {}
            // Not due before the next tick.
            Hold::Sleep(_) => return,
            Hold::GiveBack => return self.start_release(s, n, &claimed, vec![]),
        }
        let Some(window) =
            (self.rules.call_window)(now, from_millis(lease_end), self.config.xero_timeout)
        else {
            return self.start_release(s, n, &claimed, vec![]);
        };
        let Some(presented) = claimed.refresh_generation() else {
            s.parties[n].pc = Pc::Idle;
            return;
        };
        // Whoever else is waiting on Xero with this refresh token, and what the Secret forbids.
        if s.parties.iter().enumerate().any(|(m, p)| {
            m != n && matches!(&p.pc, Pc::Calling { presented: q, answer, .. } if *q == presented && !matches!(answer, Some(Answer::NoAnswer)))
        }) {
            s.concurrent_calls = true;
        }
        let ticks = window.as_millis().div_ceil(TICK.as_millis());
        s.parties[n].pc = Pc::Calling {
            claimed,
            lease_end,
            calls: calls + 1,
            presented,
            sent: millis(now),
            cut_at: (window < Duration::MAX).then(|| s.time.saturating_add(ticks as u8)),
            answer: None,
        };
    }

    /// Whether the Secret as `rec` shows it forbids calling Xero at tick `time` (give or take
    /// the skew).
    fn forbidden(&self, rec: &f::TokenRecord, time: u8) -> bool {
        let stopped = rec.stopped_for.is_some() && rec.stopped_for == rec.credentials_fingerprint();
        let reauth = rec.reauthorization_required_for.is_some()
            && rec.reauthorization_required_for
                == rec.refresh_token.as_ref().map(Sensitive::fingerprint);
        let latest_clock = super::world::at(time, self.config.skew, true);
        let backing_off = rec.retry_not_before.is_some_and(|t| latest_clock < t);
        stopped || reauth || backing_off
    }

    fn receive(&self, s: &mut State, n: usize) {
        let Pc::Calling {
            claimed,
            lease_end,
            calls,
            presented,
            sent,
            answer: Some(answer),
            ..
        } = s.parties[n].pc.clone()
        else {
            return;
        };
        let now = self.now(s, n);
        let rec = claimed.record();
        let err = match answer {
            // What the product's parser makes of an answer whose `expires_in` is out of range
            // (a replay of an access token that has expired): unusable, its refresh token kept.
            Answer::Tokens {
                generation,
                expires_in: 0,
            } => XeroError::Malformed {
                reason: "expires_in of 0 s".into(),
                refresh_token: Some(Sensitive::new(format!("rt{generation}"))),
            },
            Answer::Tokens {
                generation,
                expires_in,
            } => {
                s.parties[n].pc = Pc::Storing {
                    version: claimed.version,
                    claimed,
                    generation,
                    expires_in,
                    sent,
                    received: millis(now),
                    salvage: false,
                    stalled: false,
                };
                return;
            }
            Answer::InvalidGrant => XeroError::InvalidGrant(None),
            Answer::InvalidClient => XeroError::InvalidClient,
            Answer::Unavailable => XeroError::Unavailable(503),
            Answer::RateLimited => XeroError::RateLimited {
                retry_after: TICK,
                problem: "minute".into(),
            },
            Answer::NoAnswer => XeroError::Transport("cut".into()),
        };
        let rt = Sensitive::new(format!("rt{presented}"));
        let failure = match round::after_error(&err, Some(&rt)) {
            AfterError::InvalidGrant(_) => {
                let fresh = s.secret.record();
                match round::after_invalid_grant(&rec, &fresh, &self.identity(s, n)) {
                    InvalidGrant::Rotated { release_mine: true } => {
                        let current = s.secret.clone();
                        self.start_release(s, n, &current, vec![]);
                    }
                    InvalidGrant::Rotated {
                        release_mine: false,
                    } => s.parties[n].pc = Pc::Idle,
                    InvalidGrant::Refused => {
                        s.reauthorization_written = true;
                        let current = s.secret.clone();
                        let markers = round::reauthorization_markers(
                            Some(&rt),
                            round::reauthorization_reason(None),
                        );
                        self.start_release(s, n, &current, markers);
                    }
                }
                return;
            }
            AfterError::Salvage(new_rt) => {
                let generation = new_rt
                    .expose()
                    .strip_prefix("rt")
                    .and_then(|g| g.parse().ok())
                    .unwrap_or_default();
                s.parties[n].pc = Pc::Storing {
                    version: claimed.version,
                    claimed,
                    generation,
                    expires_in: 0,
                    sent,
                    received: millis(now),
                    salvage: true,
                    stalled: false,
                };
                return;
            }
            AfterError::Stop { code, .. } => {
                let markers = round::stop_markers(&rec, round::stop_reason(&code, None));
                return self.start_release(s, n, &claimed, markers);
            }
            AfterError::Retry(failure) => failure,
        };
        let attempt = u32::from(calls) - 1;
        let next = after_failed_call(
            failure,
            u32::from(calls),
            now,
            from_millis(lease_end),
            rec.failed_attempts,
            XERO_RETRY.ceiling(attempt) / 2,
            ACROSS_CLAIMS.ceiling(rec.failed_attempts) / 2,
        );
        match next {
            Next::CallAgain { .. } => {
                s.parties[n].pc = Pc::Holding {
                    claimed,
                    lease_end,
                    calls,
                };
            }
            Next::Release {
                not_before,
                failed_attempts,
            } => {
                let markers = round::backoff_markers(not_before, failed_attempts);
                self.start_release(s, n, &claimed, markers);
            }
        }
    }

    fn store(&self, s: &mut State, n: usize, api: Api) {
        let Pc::Storing {
            claimed,
            generation,
            expires_in,
            sent,
            received,
            version,
            salvage,
            ..
        } = s.parties[n].pc.clone()
        else {
            return;
        };
        let me = self.identity(s, n);
        let now = self.now(s, n);
        let rec = claimed.record();
        let rotation = rec.rotation.saturating_add(1);
        let set = Answer::token_set(generation, expires_in);
        let patch = if salvage {
            salvage_patch(
                &version.to_string(),
                set.refresh_token.as_ref().expect("a refresh token"),
                &me,
                now,
                rotation,
            )
        } else {
            let expires_at =
                (self.rules.stored_expiry)(&set, from_millis(sent), from_millis(received));
            (self.rules.token_patch)(
                &version.to_string(),
                &set,
                expires_at,
                &me,
                from_millis(sent),
                rotation,
            )
        };
        if api == Api::Fails {
            if let Pc::Storing { stalled, .. } = &mut s.parties[n].pc {
                *stalled = true;
            }
            return;
        }
        match Self::write(s, &patch) {
            Written::Landed if api == Api::AnswerLost => {}
            Written::Landed => {
                s.parties[n].pc = Pc::Idle;
                let stored = s.secret.record();
                if stored.is_usable(now) && self.config.roles[n] == Role::Consumer {
                    self.hand(s, &stored);
                }
            }
            Written::Conflict => match round::after_store_conflict(&rec, &s.secret.record()) {
                StoreConflict::Superseded => s.parties[n].pc = Pc::Idle,
                StoreConflict::Retry { resource_version } => {
                    if let Pc::Storing { version, .. } = &mut s.parties[n].pc {
                        *version = resource_version.parse().unwrap_or_default();
                    }
                }
            },
        }
    }

    fn start_release(
        &self,
        s: &mut State,
        n: usize,
        on: &StoredSecret,
        markers: Vec<(&'static str, Option<String>)>,
    ) {
        s.parties[n].pc = Pc::Releasing {
            version: on.version,
            markers,
            mine: true,
            tries: 0,
        };
    }

    fn release(&self, s: &mut State, n: usize) {
        let Pc::Releasing {
            version,
            markers,
            mine,
            tries,
        } = s.parties[n].pc.clone()
        else {
            return;
        };
        let rv = version.to_string();
        let patch = if mine {
            (self.rules.release_patch)(&rv, &markers)
        } else {
            annotations_patch(&rv, &markers)
        };
        if Self::write(s, &patch) == Written::Landed || tries + 1 >= RELEASE_TRIES {
            s.parties[n].pc = Pc::Idle;
            return;
        }
        let next = round::after_release_conflict(
            &s.secret.record(),
            &self.identity(s, n),
            !markers.is_empty(),
        );
        let (mine, resource_version) = match next {
            ReleaseConflict::Release { resource_version } => (true, resource_version),
            ReleaseConflict::MarkersOnly { resource_version } => (false, resource_version),
            ReleaseConflict::Done => {
                s.parties[n].pc = Pc::Idle;
                return;
            }
        };
        s.parties[n].pc = Pc::Releasing {
            version: resource_version.parse().unwrap_or_default(),
            markers,
            mine,
            tries: tries + 1,
        };
    }

    /// A path, one step a line: the action and what it changed in the Secret and at Xero.
    pub fn trace(&self, path: &stateright::Path<State, Act>) -> String {
        let mut out = String::new();
        for (state, action) in path.clone().into_vec() {
            let rec = state.secret.record();
            let lease = match &rec.lease {
                f::Lease::Held { holder, expires } => {
                    format!("claim {holder} to {}", tick_of(*expires))
                }
                _ => "no claim".to_owned(),
            };
            let line = format!(
                "t={} v{} {} {} at={} exp={} | xero rt{} calls={} replays={} refused={} | {}",
                state.time,
                state.secret.version,
                state
                    .secret
                    .data
                    .get(f::REFRESH_TOKEN)
                    .map_or("-", String::as_str),
                lease,
                state
                    .secret
                    .data
                    .get(f::ACCESS_TOKEN)
                    .map_or("-", String::as_str),
                match rec.expiry {
                    f::Expiry::At(t) => tick_of(t),
                    _ => "-".into(),
                },
                state.xero.current,
                state.xero.calls,
                state.xero.replays,
                state.xero.refused,
                state
                    .parties
                    .iter()
                    .map(|p| describe(&p.pc))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            out.push_str(&line);
            out.push('\n');
            if let Some(action) = action {
                out.push_str(&format!("  -> {}\n", self.format_action(&action)));
            }
        }
        out
    }
}

fn describe(pc: &Pc) -> String {
    match pc {
        Pc::Idle => "idle".into(),
        Pc::Holding { calls, .. } => format!("holding({calls} calls)"),
        Pc::Calling {
            presented, answer, ..
        } => format!("calling(rt{presented}, {answer:?})"),
        Pc::Storing {
            generation,
            version,
            ..
        } => format!("storing(rt{generation} on v{version})"),
        Pc::Releasing {
            version, markers, ..
        } => format!(
            "releasing(v{version}{})",
            if markers.is_empty() {
                ""
            } else {
                " with markers"
            }
        ),
    }
}

fn tick_of(t: SystemTime) -> String {
    let base = super::world::at(0, Duration::ZERO, true);
    match t.duration_since(base) {
        Ok(d) => format!("{:.1}", d.as_secs_f64() / TICK.as_secs_f64()),
        Err(e) => format!("-{:.1}", e.duration().as_secs_f64() / TICK.as_secs_f64()),
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}
