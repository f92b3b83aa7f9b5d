//! An exhaustive model check of the refresh protocol (docs/protocol.md, "Model check") with
//! [`stateright`], driving the product's own pure rules: [`decide`] through [`round::next`],
//! [`round::hold`], [`retry::call_window`], [`round::after_error`],
//! [`retry::after_failed_call`], [`round::after_invalid_grant`],
//! [`round::after_store_conflict`], [`round::after_release_conflict`],
//! [`round::stored_expiry`], and the merge patches of [`format`] applied to a model of the API
//! server ([`world`]). Nothing of the protocol is re-implemented here; what the model adds is
//! the world: the order in which parties, Xero, faults and the clock move.
//!
//! Parties are the controller and consumers, each with its own clock (within the configured
//! skew of each other); each may crash at any step. Xero rotates the refresh token on every use,
//! honours the previous one for a grace period (a replay), and may answer 503, 429,
//! `invalid_client`, or act on a call whose answer is lost. Calls are cut when their window
//! ends. Consumers may decide on a follower's copy one version behind.
//!
//! [`decide`]: xero_operator::protocol::decide::decide
//! [`format`]: xero_operator::protocol::format

mod party;
pub mod world;

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use stateright::{Checker, HasDiscoveries, Model, Property};
use xero_operator::protocol::decide::Role;
use xero_operator::protocol::format::{self, release_patch};
use xero_operator::protocol::{retry, round};
use xero_operator::xero::TokenSet;

pub use party::{Act, Api, Outcome, Party, Pc};
use world::{StoredSecret, TICK, Xero};

/// A release patch builder: `(resourceVersion, markers)` to a merge patch.
pub type ReleasePatch = fn(&str, &[(&str, Option<String>)]) -> Value;

/// The product's rules the model calls, as plain functions, so a test can put a rule with one
/// line removed in place of one and show the model finds what that breaks.
#[derive(Clone, Copy)]
pub struct Rules {
    /// A round's next action from what it read ([`round::next`]).
    pub next: fn(&round::Facts) -> round::Action,
    /// The claim's write ([`format::claim_patch`]).
    pub claim_patch: fn(&str, &str, SystemTime) -> Value,
    /// How long a call may last within a claim ([`retry::call_window`]).
    pub call_window: fn(SystemTime, SystemTime, Duration) -> Option<Duration>,
    /// The store of an answer ([`format::token_patch`]).
    pub token_patch: TokenPatch,
    pub release_patch: ReleasePatch,
    pub stored_expiry: fn(&TokenSet, SystemTime, SystemTime) -> SystemTime,
}

/// A store builder: `(resourceVersion, answer, expires_at, refreshed_by, sent, rotation)` to a
/// merge patch.
pub type TokenPatch = fn(&str, &TokenSet, SystemTime, &str, SystemTime, u64) -> Value;

impl Rules {
    /// The product's rules as they are.
    pub fn product() -> Self {
        Self {
            next: round::next,
            claim_patch: format::claim_patch,
            call_window: retry::call_window,
            token_patch: format::token_patch,
            release_patch,
            stored_expiry: |set, sent, _received| round::stored_expiry(set, sent),
        }
    }
}

/// What is modelled, and how far.
#[derive(Clone, Debug)]
pub struct Config {
    /// The parties: the controller first, then consumers.
    pub roles: Vec<Role>,
    /// Each party's clock ahead of true time (at most the skew apart).
    pub clock_ahead: Vec<Duration>,
    /// Ticks the clock may advance.
    pub horizon: u8,
    /// Faults Xero or the API server may answer with, in all.
    pub faults: u8,
    /// Crashes of parties, in all.
    pub crashes: u8,
    /// Xero's access-token life, and its grace period for a used refresh token, in ticks.
    pub life_ticks: u8,
    pub grace_ticks: u8,
    /// The connection's clock skew and claim length, and the parties' call timeout.
    pub skew: Duration,
    pub lease: Duration,
    pub xero_timeout: Duration,
    /// Steps explored at most from the initial state.
    pub depth: usize,
}

impl Config {
    /// What `make test` checks: the controller and one consumer whose clock is a skew ahead,
    /// one fault, one crash, three token lifetimes' worth of ticks.
    pub fn quick() -> Self {
        Self {
            roles: vec![
                Role::Producer {
                    ahead: Duration::ZERO,
                },
                Role::Consumer,
            ],
            clock_ahead: vec![Duration::ZERO, TICK],
            horizon: 9,
            faults: 1,
            crashes: 1,
            life_ticks: 3,
            grace_ticks: u8::MAX,
            skew: TICK,
            lease: 4 * TICK,
            xero_timeout: 3 * TICK,
            depth: 20,
        }
    }

    /// The opt-in deeper run (`make model-deep`): two consumers, more faults and crashes.
    pub fn deep() -> Self {
        Self {
            roles: vec![
                Role::Producer {
                    ahead: Duration::ZERO,
                },
                Role::Consumer,
                Role::Consumer,
            ],
            clock_ahead: vec![Duration::ZERO, TICK, Duration::ZERO],
            faults: 2,
            crashes: 1,
            depth: 22,
            ..Self::quick()
        }
    }
}

/// The whole world in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    pub time: u8,
    pub secret: StoredSecret,
    /// The version before the current one (what a lagging follower may still show).
    pub previous: Option<StoredSecret>,
    pub xero: Xero,
    pub parties: Vec<Party>,
    pub faults_left: u8,
    pub crashes_left: u8,
    /// A party crashed, an answer Xero acted on never arrived, or a store met an API fault.
    pub disrupted: bool,
    /// Property witnesses, set when a step breaks one.
    pub handed_expired: bool,
    pub concurrent_calls: bool,
    pub marker_ignored: bool,
    pub reauthorization_written: bool,
    /// Xero refused the app's credentials for good (only a person can go on from there).
    pub refused_for_good: bool,
}

/// The refresh protocol in its world.
pub struct ProtocolModel {
    pub config: Config,
    pub rules: Rules,
}

impl ProtocolModel {
    pub fn new(config: Config, rules: Rules) -> Self {
        Self { config, rules }
    }

    /// The identity party `party` claims under in `state` (a new one after each restart).
    pub fn identity(&self, state: &State, party: usize) -> String {
        let name = match self.config.roles[party] {
            Role::Producer { .. } => "controller".to_owned(),
            _ => format!("consumer-{party}"),
        };
        match state.parties[party].incarnation {
            0 => name,
            k => format!("{name}#{k}"),
        }
    }

    /// Party `party`'s clock at tick `time`.
    pub fn clock(&self, party: usize, time: u8) -> SystemTime {
        world::at(time, self.config.clock_ahead[party], true)
    }

    /// Whether, from `state`, with Xero answering and no party crashing, a fair schedule
    /// (every party and Xero in turn, the clock when nothing else moves) stores a token that is
    /// really usable, within a bounded number of steps.
    pub fn recovers(&self, state: &State) -> bool {
        let mut s = state.clone();
        for _ in 0..400 {
            let really_usable = s
                .secret
                .data
                .get(xero_operator::protocol::format::ACCESS_TOKEN)
                .and_then(|at| at.strip_prefix("at")?.parse::<u8>().ok())
                .is_some_and(|g| {
                    usize::from(g) < s.xero.expires.len() && s.xero.expiry_tick(g) > s.time
                });
            if really_usable && s.parties.iter().all(|p| p.pc == Pc::Idle) {
                return true;
            }
            let mut acts = Vec::new();
            self.party_actions(&s, &mut acts, true);
            let moved = acts
                .into_iter()
                .filter_map(|a| self.step(&s, a))
                .find(|next| *next != s);
            match moved {
                Some(next) => s = next,
                None if s.time < u8::MAX - 1 => s.time += 1,
                None => return false,
            }
        }
        false
    }
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Act;

    fn init_states(&self) -> Vec<State> {
        let c = &self.config;
        let first_expiry = 2;
        let secret = world::initial_secret(
            world::at(first_expiry, Duration::ZERO, true),
            c.skew,
            c.lease,
        );
        vec![State {
            time: 0,
            secret,
            previous: None,
            xero: Xero::new(first_expiry, c.grace_ticks),
            parties: c
                .roles
                .iter()
                .map(|_| Party {
                    pc: Pc::Idle,
                    incarnation: 0,
                })
                .collect(),
            faults_left: c.faults,
            crashes_left: c.crashes,
            disrupted: false,
            handed_expired: false,
            concurrent_calls: false,
            marker_ignored: false,
            reauthorization_written: false,
            refused_for_good: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Act>) {
        self.party_actions(state, actions, false);
        if state.time < self.config.horizon {
            actions.push(Act::Tick);
        }
    }

    fn next_state(&self, state: &State, action: Act) -> Option<State> {
        self.step(state, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "the refresh chain never breaks",
                |m: &ProtocolModel, s: &State| m.chain_holds(s),
            ),
            Property::always(
                "no re-authorisation is asked without a revocation",
                |_, s: &State| !s.reauthorization_written,
            ),
            Property::always("no party hands out an expired token", |_, s: &State| {
                !s.handed_expired
            }),
            Property::always(
                "absent crashes and lost answers, every call rotates (one call per expiry)",
                |_, s: &State| s.disrupted || (s.xero.replays == 0 && s.xero.refused == 0),
            ),
            Property::always(
                "every stop and backoff marker is honoured",
                |_, s: &State| !s.marker_ignored,
            ),
            Property::always(
                "two parties never wait on Xero with one refresh token",
                |_, s: &State| !s.concurrent_calls,
            ),
            Property::always(
                "liveness: with Xero up and parties alive, a usable token is stored",
                |m: &ProtocolModel, s: &State| {
                    s.time < m.config.horizon || s.refused_for_good || m.recovers(s)
                },
            ),
            Property::sometimes("the token is rotated twice", |_, s: &State| {
                s.xero.current >= 2
            }),
        ]
    }

    fn within_boundary(&self, state: &State) -> bool {
        state.time <= self.config.horizon
    }
}

impl ProtocolModel {
    /// The stored refresh token is one Xero accepts, or Xero's newest is on its way to the
    /// Secret (a party holds the answer).
    fn chain_holds(&self, s: &State) -> bool {
        let stored = s.secret.refresh_generation();
        stored.is_some_and(|g| s.xero.accepts(g, s.time))
            || s.parties.iter().any(|p| p.carries(s.xero.current))
    }
}

/// What one check found.
pub struct Report {
    pub states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    /// Property broken → the trace that breaks it, readable.
    pub counterexamples: Vec<(&'static str, String)>,
    /// `sometimes` properties never met (the model did not reach what it should).
    pub unreached: Vec<&'static str>,
}

/// Checks `model` breadth-first to its configured depth.
pub fn check(model: ProtocolModel) -> Report {
    run(model, HasDiscoveries::All)
}

/// Checks `model` breadth-first until a property breaks (the shortest trace that breaks it),
/// or to its configured depth.
pub fn check_until_broken(model: ProtocolModel) -> Report {
    run(model, HasDiscoveries::AnyFailures)
}

fn run(model: ProtocolModel, finish: HasDiscoveries) -> Report {
    let depth = model.config.depth;
    let started = Instant::now();
    let checker = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, usize::from))
        .target_max_depth(depth)
        .finish_when(finish)
        .spawn_bfs()
        .join();
    let elapsed = started.elapsed();
    let model = checker.model();
    let mut counterexamples = Vec::new();
    let mut unreached = Vec::new();
    for property in model.properties() {
        let found = checker.discovery(property.name);
        match (property.expectation, found) {
            (stateright::Expectation::Sometimes, None) => unreached.push(property.name),
            (stateright::Expectation::Sometimes, Some(_)) => {}
            (_, Some(path)) => counterexamples.push((property.name, model.trace(&path))),
            (_, None) => {}
        }
    }
    Report {
        states: checker.state_count(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        counterexamples,
        unreached,
    }
}
