//! The controller's cap on the token calls of each Xero app (client id), so a thousand
//! connections expiring in the same second never burst past Xero's app-wide limit, and no
//! namespace spends another's share.
//!
//! GCRA as virtual scheduling: a schedule has a theoretical arrival time that every call pushes
//! on by a period; a call may go out once it is within the burst's tolerance of it. Each app has
//! one, and each (app, namespace) one of its own at half the app's rate, so one namespace's
//! storm takes at most half of an app's calls and the others keep the rest; other apps are never
//! touched.
//!
//! Nobody waits in the gate (a reconcile never holds a worker slot for a permit): a call that
//! may not go out now is told when to come back, holding a **turn**. First the namespace's: a
//! slot of the namespace's schedule, reserved in the order callers ask. Only once that turn is
//! due does the caller take a slot of the app's schedule (an app **ticket**, reserved too), so
//! the app's slots go to namespaces in the order their turns come due: a storming namespace
//! holds at most one ticket per turn of its share, the others' callers come between, and each
//! caller comes back once, at its own time (no herd asking for the same slot).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many namespaces' worth of an app's calls one namespace may take at most (it gets
/// `1 / NAMESPACE_SHARE` of them).
pub const NAMESPACE_SHARE: u32 = 2;
/// Schedules kept before the ones long caught up with are dropped.
const PRUNE_ABOVE: usize = 4096;

/// One GCRA schedule's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rate {
    period: Duration,
    /// How far ahead of its theoretical arrival time a call may go (the burst).
    tolerance: Duration,
}

impl Rate {
    fn per_minute(per_minute: NonZeroU32) -> Self {
        let (burst, period) = bucket_for(per_minute);
        Self {
            period,
            tolerance: period * (burst.get() - 1),
        }
    }

    /// The earliest instant a call asked for at `now` may go out, given the theoretical
    /// arrival time `tat`.
    fn earliest(self, tat: Option<Instant>, now: Instant) -> Instant {
        match tat.and_then(|t| t.checked_sub(self.tolerance)) {
            Some(allowed) if allowed > now => allowed,
            _ => now,
        }
    }

    /// The theoretical arrival time after a call at `at`.
    fn after(self, tat: Option<Instant>, at: Instant) -> Instant {
        tat.map_or(at, |t| t.max(at)) + self.period
    }
}

/// A shared cap of token calls per app, and per app and namespace.
#[derive(Clone)]
pub struct AppGate {
    app: Rate,
    namespace: Rate,
    schedules: Arc<Mutex<Schedules>>,
    /// Told the app (as the caller named it: the controller names apps by their client id's
    /// fingerprint) of each permit given; the controller counts them per app.
    on_permit: Option<PermitHook>,
}

#[derive(Default)]
struct Schedules {
    apps: HashMap<String, Instant>,
    namespaces: HashMap<(String, String), Instant>,
}

/// Told the client id of each permit given.
type PermitHook = Arc<dyn Fn(&str) + Send + Sync>;

impl AppGate {
    /// At most `per_minute` calls per app in any 60-second window (see [`bucket_for`]), and at
    /// most `per_minute / NAMESPACE_SHARE` (at least 1) per app and namespace.
    pub fn per_minute(per_minute: NonZeroU32) -> Self {
        let share = NonZeroU32::new((per_minute.get() / NAMESPACE_SHARE).max(1)).expect("1");
        Self {
            app: Rate::per_minute(per_minute),
            namespace: Rate::per_minute(share),
            schedules: Arc::default(),
            on_permit: None,
        }
    }

    /// Calls `f` with the client id of each permit given.
    pub fn with_on_permit(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_permit = Some(Arc::new(f));
        self
    }

    /// May a call of `app` from `namespace` go out at `now`? `holding`: the turn the caller
    /// holds from an earlier [`Permit::ComeBack`], if it is due.
    pub fn ask(&self, app: &str, namespace: &str, holding: Option<Turn>, now: Instant) -> Permit {
        let mut s = lock(&self.schedules);
        if holding.is_none() {
            let key = (app.to_owned(), namespace.to_owned());
            let ns_tat = s.namespaces.get(&key).copied();
            let at = self.namespace.earliest(ns_tat, now);
            s.namespaces.insert(key, self.namespace.after(ns_tat, at));
            if at > now {
                return Permit::ComeBack {
                    at,
                    turn: Turn::Namespace,
                };
            }
        }
        if holding != Some(Turn::App) {
            let app_tat = s.apps.get(app).copied();
            let at = self.app.earliest(app_tat, now);
            s.apps.insert(app.to_owned(), self.app.after(app_tat, at));
            if at > now {
                return Permit::ComeBack {
                    at,
                    turn: Turn::App,
                };
            }
        }
        if s.apps.len() + s.namespaces.len() > PRUNE_ABOVE {
            // A schedule that has caught up with now is the same as none.
            s.apps.retain(|_, tat| *tat > now);
            s.namespaces.retain(|_, tat| *tat > now);
        }
        drop(s);
        if let Some(f) = &self.on_permit {
            f(app);
        }
        Permit::Go
    }

    /// Whether a call of `app` from `namespace` may go out now (taking the permit if so).
    pub fn try_now(&self, app: &str, namespace: &str) -> bool {
        self.ask(app, namespace, None, Instant::now()) == Permit::Go
    }
}

/// The gate's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Call now.
    Go,
    /// Ask again at `at`, holding `turn`.
    ComeBack { at: Instant, turn: Turn },
}

/// A reserved slot a caller holds between two asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Its namespace's turn: next, a slot of the app's schedule.
    Namespace,
    /// A slot of the app's schedule as well: it goes.
    App,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bucket's burst and refill period for a cap of `per_minute` calls in any 60-second window.
///
/// A full bucket lets `burst` calls through at once and then one per `period`, so a 60-second
/// window can see `burst + 60 s / period` calls. The refill is slowed by the burst to keep that
/// within the cap (a bucket refilling at the full cap let a storm reach cap + burst: 3,273 calls
/// in a minute under a 3,000 cap). The burst is a hundredth of the cap, so the sustained rate
/// stays within 1 % of it.
pub fn bucket_for(per_minute: NonZeroU32) -> (NonZeroU32, std::time::Duration) {
    let cap = per_minute.get();
    let burst = (cap / 100).max(1);
    let refills = (cap - burst).max(1);
    let burst = NonZeroU32::new(burst).expect("at least 1");
    (burst, std::time::Duration::from_secs(60) / refills)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(cap: u32) -> AppGate {
        AppGate::per_minute(NonZeroU32::new(cap).expect("nonzero"))
    }

    #[test]
    fn bursts_are_a_hundredth_of_the_minute_and_apps_are_separate() {
        let g = gate(1000);
        let admitted = (0..50)
            .filter(|i| g.try_now("app-a", &format!("ns-{i}")))
            .count();
        assert_eq!(admitted, 10, "burst of 1000/100");
        assert!(g.try_now("app-b", "ns-0"), "another app has its own bucket");
        // One namespace: half of it.
        let g = gate(1000);
        let admitted = (0..50).filter(|_| g.try_now("app-a", "ns")).count();
        assert_eq!(admitted, 5, "a namespace's burst: its share's");
    }

    #[test]
    fn no_minute_sees_more_than_the_cap_and_the_rate_stays_near_it() {
        for cap in [
            1, 2, 10, 99, 100, 101, 1000, 3000, 10_000, 60_000, 1_000_000,
        ] {
            let (burst, period) = bucket_for(NonZeroU32::new(cap).expect("nonzero"));
            // The most a window [t, t + 60 s) can see: the burst at t, then one call at each
            // t + k·period (k ≥ 1) before its end.
            let refills = (60_000_000_000u128.div_ceil(period.as_nanos()) - 1) as u32;
            assert!(
                burst.get() + refills <= cap,
                "cap {cap}: burst {burst} + {refills} refills"
            );
            if cap >= 100 {
                let sustained = 60.0 / period.as_secs_f64();
                assert!(
                    sustained >= 0.98 * f64::from(cap),
                    "cap {cap}: {sustained}/min"
                );
            }
        }
    }

    #[test]
    fn a_tiny_quota_still_admits_one() {
        let g = gate(1);
        assert!(g.try_now("a", "ns"));
        assert!(!g.try_now("a", "ns"));
    }

    /// Asks until each caller has gone, as a controller's requeues would: returns each
    /// caller's go time.
    fn serve(g: &AppGate, callers: &[(&str, &str)], start: Instant) -> Vec<Instant> {
        let mut pending: Vec<(usize, Instant, Option<Turn>)> =
            (0..callers.len()).map(|i| (i, start, None)).collect();
        let mut went = vec![start; callers.len()];
        let mut asks = 0;
        while !pending.is_empty() {
            pending.sort_by_key(|(i, at, _)| (*at, *i));
            let (i, at, holding) = pending.remove(0);
            asks += 1;
            match g.ask(callers[i].0, callers[i].1, holding, at) {
                Permit::Go => went[i] = at,
                Permit::ComeBack { at, turn } => pending.push((i, at, Some(turn))),
            }
        }
        // Each caller asks three times at most: no herd.
        assert!(
            asks <= 3 * callers.len(),
            "{asks} asks for {} callers",
            callers.len()
        );
        went
    }

    #[test]
    fn a_namespace_is_served_in_turn_at_its_share_of_the_rate() {
        // 600 a minute for the app; 300 a minute (one per 200 ms, a burst of 3) per namespace.
        let g = gate(600);
        let start = Instant::now();
        let callers = vec![("app", "a"); 30];
        let went = serve(&g, &callers, start);
        let (_, ns_period) = bucket_for(NonZeroU32::new(300).expect("nonzero"));
        let last = went.iter().max().expect("went").duration_since(start);
        let expected = ns_period * (30 - 3);
        assert!(
            last >= expected.mul_f64(0.95) && last <= expected.mul_f64(1.1),
            "{last:?}, expected about {expected:?}"
        );
        // In the order they asked.
        assert!(went.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn three_storming_namespaces_share_the_app_in_turn() {
        let g = gate(600);
        let start = Instant::now();
        let mut callers = Vec::new();
        for ns in ["a", "b", "c"] {
            callers.extend(vec![("app", ns); 30]);
        }
        let went = serve(&g, &callers, start);
        // Each namespace's last call comes at about the same time: the app's calls went to
        // them in turn, none starved.
        let last = |k: usize| {
            went[30 * k..30 * (k + 1)]
                .iter()
                .max()
                .expect("went")
                .duration_since(start)
                .as_secs_f64()
        };
        let (a, b, c) = (last(0), last(1), last(2));
        let (lo, hi) = (a.min(b).min(c), a.max(b).max(c));
        assert!(
            hi - lo <= 0.2 * hi,
            "last calls at {a:.1} s, {b:.1} s, {c:.1} s"
        );
    }

    #[test]
    fn one_namespaces_storm_leaves_the_others_their_share() {
        let g = gate(600);
        let start = Instant::now();
        let (_, app_period) = bucket_for(NonZeroU32::new(600).expect("nonzero"));
        // 60 calls from a storming namespace, 10 from a quiet one, all asked at once.
        let mut callers = vec![("app", "storm"); 60];
        callers.extend(vec![("app", "quiet"); 10]);
        let went = serve(&g, &callers, start);
        let storm_end = went[..60]
            .iter()
            .max()
            .expect("storm")
            .duration_since(start);
        let quiet_end = went[60..]
            .iter()
            .max()
            .expect("quiet")
            .duration_since(start);
        // The quiet namespace is not queued behind the storm: its ten calls go at its own
        // share's pace, within the first sixth of the storm.
        assert!(
            quiet_end <= storm_end / 4,
            "quiet done at {quiet_end:?}, the storm at {storm_end:?}"
        );
        // And the app's cap holds overall: no minute-long window sees more than 600 (here: the
        // 70 calls take at least 70 - burst app periods).
        let all_end = went.iter().max().expect("all").duration_since(start);
        assert!(all_end >= app_period * (70 - 6), "{all_end:?}");
        // Another app is not touched.
        assert_eq!(g.ask("other-app", "storm", None, start), Permit::Go);
    }
}
