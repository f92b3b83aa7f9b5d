//! Shell completion for `kubectl xero`, the way kubectl completes plugins (kubectl 1.26 and
//! later): for `kubectl xero <TAB>` kubectl runs `kubectl_complete-xero` (shipped beside the
//! plugin: `deploy/krew/kubectl_complete-xero`, which runs `kubectl-xero __complete`) with the
//! words after `kubectl xero`, the last one the word being typed, and reads one candidate per
//! line and then `:<directive>` (Cobra's protocol, which kubectl's completion speaks).
//! Subcommands, flags and, for a connection's name, the XeroConnections of the namespace.

use clap::CommandFactory;

use super::Args;

/// Cobra's directive "do not complete file names".
pub const NO_FILE_COMPLETION: u8 = 4;

/// Flags that take a value as the next word (so that word is not a subcommand or a name).
fn takes_value(cmd: &clap::Command, word: &str) -> bool {
    let matches = |a: &clap::Arg| {
        word.strip_prefix("--")
            .is_some_and(|long| a.get_long() == Some(long))
            || word
                .strip_prefix('-')
                .and_then(|s| s.chars().next().filter(|_| s.len() == 1))
                .is_some_and(|short| a.get_short() == Some(short))
    };
    cmd.get_arguments()
        .filter(|a| matches(a))
        .any(|a| a.get_action().takes_values())
}

/// What the typed words complete to. `connections(namespace)` lists the XeroConnections of a
/// namespace (`None`: the kubeconfig's), asked only when a name is what comes next.
pub fn candidates(
    words: &[String],
    connections: impl FnOnce(Option<&str>) -> Vec<String>,
) -> Vec<String> {
    let root = Args::command();
    let (typing, before) = match words.split_last() {
        Some((last, rest)) => (last.as_str(), rest),
        None => ("", &[][..]),
    };
    let mut sub: Option<&clap::Command> = None;
    let mut namespace = None;
    let mut positionals = 0;
    let mut skip_value = false;
    let mut unknown = false;
    for (i, word) in before.iter().enumerate() {
        if skip_value {
            skip_value = false;
            continue;
        }
        let cmd = sub.unwrap_or(&root);
        if word.starts_with('-') {
            if let Some(ns) = word
                .strip_prefix("--namespace=")
                .or_else(|| word.strip_prefix("-n=").or_else(|| word.strip_prefix("-n")))
                .filter(|ns| !ns.is_empty())
            {
                // `--namespace=NS`, `-n=NS` and `-nNS`, as kubectl takes them.
                namespace = Some(ns.to_owned());
                continue;
            } else if (word == "-n" || word == "--namespace") && i + 1 < before.len() {
                namespace = Some(before[i + 1].clone());
            }
            skip_value =
                !word.contains('=') && (takes_value(cmd, word) || takes_value(&root, word));
            continue;
        }
        match sub {
            None => match root.find_subcommand(word) {
                Some(cmd) => sub = Some(cmd),
                None => unknown = true,
            },
            Some(_) => positionals += 1,
        }
    }
    let mut out: Vec<String> = if skip_value || unknown {
        // The value of a flag (a namespace, a duration, a host), or after a word that is no
        // subcommand: nothing to offer.
        Vec::new()
    } else if typing.starts_with('-') {
        let mut flags: Vec<String> = root
            .get_arguments()
            .chain(sub.into_iter().flat_map(clap::Command::get_arguments))
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        flags.extend(["--help".to_owned()]);
        flags
    } else {
        match sub {
            None => root
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(|c| c.get_name().to_owned())
                .collect(),
            Some(cmd) if positionals == 0 && cmd.get_positionals().next().is_some() => {
                connections(namespace.as_deref())
            }
            Some(_) => Vec::new(),
        }
    };
    out.retain(|c| c.starts_with(typing));
    out.sort();
    out.dedup();
    out
}

/// The XeroConnections of `namespace`, or none when the API cannot say within a few seconds.
async fn connection_names(namespace: Option<String>) -> Vec<String> {
    let list = async {
        let client = kube::Client::try_default().await.ok()?;
        let ns = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        let api: kube::Api<crate::crd::XeroConnection> = kube::Api::namespaced(client, &ns);
        let list = api
            .list_metadata(&kube::api::ListParams::default())
            .await
            .ok()?;
        Some(
            list.items
                .into_iter()
                .filter_map(|m| m.metadata.name)
                .collect::<Vec<_>>(),
        )
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), list)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `kubectl-xero __complete WORDS…`: prints the candidates and the directive.
pub async fn run(words: &[String]) {
    let mut wanted = None;
    let mut out = candidates(words, |ns| {
        wanted = Some(ns.map(str::to_owned));
        Vec::new()
    });
    if let Some(namespace) = wanted {
        let typing = words.last().map_or("", String::as_str);
        out = connection_names(namespace).await;
        out.retain(|c| c.starts_with(typing));
    }
    for candidate in out {
        println!("{candidate}");
    }
    println!(":{NO_FILE_COMPLETION}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(line: &str) -> Vec<String> {
        let mut words: Vec<String> = line.split(' ').map(str::to_owned).collect();
        if line.is_empty() {
            words = vec![String::new()];
        }
        candidates(&words, |ns| {
            vec![format!("conn-in-{}", ns.unwrap_or("default"))]
        })
    }

    #[test]
    fn subcommands_flags_and_connection_names_complete() {
        assert_eq!(complete(""), ["authorize", "renew", "status"]);
        assert_eq!(complete("re"), ["renew"]);
        assert_eq!(complete("status "), ["conn-in-default"]);
        assert_eq!(complete("-n team-a renew "), ["conn-in-team-a"]);
        assert_eq!(complete("renew --namespace=team-b "), ["conn-in-team-b"]);
        assert_eq!(complete("renew -nteam-b "), ["conn-in-team-b"]);
        assert_eq!(complete("renew -n=team-b "), ["conn-in-team-b"]);
        assert_eq!(
            complete("renew acme "),
            Vec::<String>::new(),
            "one name only"
        );
        assert_eq!(complete("renew --ti"), ["--timeout"]);
        assert!(complete("--").contains(&"--namespace".to_owned()));
        // The value of a flag is not a subcommand or a name.
        assert_eq!(complete("-n "), Vec::<String>::new());
        assert_eq!(complete("renew --timeout "), Vec::<String>::new());
        assert_eq!(complete("nope "), Vec::<String>::new());
    }
}
