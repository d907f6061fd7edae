//! The Redis ACL rule that confines a user to one deployment (namespace + db).
//!
//! Redis applies a user's ACL to the commands its scripts run too, so the rule allows every
//! command of `docs/protocol.md` §2.1 (§2.2 on a cluster), the ones the registry scripts run
//! included, and nothing else. Keys are confined to the registry's hash tag and to the
//! scope's claims and exactly-once records (`namespace:db:claim:*`, `namespace:db:once:*`,
//! with no tag so that they spread over a cluster's slots), channels to the scope; [`Config::validate`] refuses namespaces with glob
//! characters, so no pattern of one deployment can match another's names.

use crate::config::Config;
use crate::error::Error;

/// Commands every node sends, on one server and on a cluster alike. `client|id` and
/// `info|server` are what fred 10.1 sends on every new connection (it caches the connection
/// id and the server version, and would go on without them, but a denial would land in
/// `ACL LOG` at every connect); `info|server` is a first-argument rule, so the other `INFO`
/// sections (clients, keyspace, ...) stay denied. `SET` (with `PX`) and `GETDEL` store and
/// take claims; `DEL`, which also deletes them, is among the scripts' commands below.
const COMMON: &[&str] = &[
    "+auth",
    "+ping",
    "+client|id",
    "+info|server",
    "+evalsha",
    "+script|load",
    "+hgetall",
    "+quit",
    "+set",
    "+getdel",
];

/// Classic pub/sub on one server; `select|<db>` is added with the db.
const STANDALONE: &[&str] = &["+subscribe", "+unsubscribe", "+publish"];

/// Sharded pub/sub on a cluster, the subscription check of every heartbeat, and fred's own
/// cluster commands: `CLUSTER INFO` on every new connection (a denial fails the connection)
/// and `CLUSTER SLOTS` to read the slot map.
const CLUSTER: &[&str] = &[
    "+ssubscribe",
    "+sunsubscribe",
    "+spublish",
    "+pubsub|shardnumsub",
    "+cluster|info",
    "+cluster|slots",
];

/// What the registry scripts run (`PUBLISH`, or `SPUBLISH` on a cluster, is in the lists
/// above), and the exactly-once scripts (`GET`, `SET`, `DEL`).
const SCRIPTS: &[&str] = &[
    "+time",
    "+zadd",
    "+zremrangebyscore",
    "+zrange",
    "+zrem",
    "+pttl",
    "+pexpire",
    "+exists",
    "+del",
    "+hget",
    "+hset",
    "+hexists",
    "+hincrby",
    "+hdel",
    "+get",
];

/// See [`Config::acl_rule`].
pub(crate) fn rule(config: &Config, user: &str, password: &str) -> Result<String, Error> {
    config.validate()?;
    for (what, value) in [("user name", user), ("password", password)] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\''))
        {
            return Err(Error::Config(format!(
                "the ACL {what} must be non-empty, without whitespace or quotes, so that the \
                 rule can be pasted into redis-cli as it is"
            )));
        }
    }
    let scope = format!("{}:{}", config.namespace, config.get_db());
    let mut words = vec![
        "ACL".to_string(),
        "SETUSER".to_string(),
        user.to_string(),
        "on".to_string(),
        format!(">{password}"),
        "resetkeys".to_string(),
        format!("~{{{scope}}}:*"),
        format!("~{scope}:claim:*"),
        format!("~{scope}:once:*"),
        "resetchannels".to_string(),
        format!("&{scope}:*"),
    ];
    if config.is_cluster() {
        words.push(format!("&{{{scope}}}:events"));
    }
    words.push("nocommands".to_string());
    words.extend(COMMON.iter().map(|c| c.to_string()));
    if config.is_cluster() {
        words.extend(CLUSTER.iter().map(|c| c.to_string()));
    } else {
        words.push(format!("+select|{}", config.get_db()));
        words.extend(STANDALONE.iter().map(|c| c.to_string()));
        if config.is_sentinel() {
            // fred checks that the node the sentinels named is a primary.
            words.push("+role".to_string());
        }
    }
    words.extend(SCRIPTS.iter().map(|c| c.to_string()));
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = include_str!("../../docs/protocol.md");

    fn documented(prefix: &str) -> &'static str {
        SPEC.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("protocol.md has a line starting {prefix:?}"))
    }

    #[test]
    fn the_documented_standalone_rule_is_the_generated_one() {
        let config = Config::from_url("redis://127.0.0.1:6379/3").expect("url");
        assert_eq!(
            config.acl_rule("clouds", "secret").expect("rule"),
            documented("ACL SETUSER clouds ")
        );
    }

    #[test]
    fn the_documented_cluster_rule_is_the_generated_one() {
        let config = Config::from_url("redis-cluster://127.0.0.1:7000").expect("url");
        assert_eq!(
            config.acl_rule("clouds-cluster", "secret").expect("rule"),
            documented("ACL SETUSER clouds-cluster ")
        );
    }

    #[test]
    fn a_sentinel_deployment_may_ask_for_the_role() {
        let config = Config::sentinel("orders", ["127.0.0.1:26379"]).expect("sentinel");
        let rule = config.acl_rule("orders", "secret").expect("rule");
        assert!(
            rule.ends_with(" +role") || rule.contains(" +role "),
            "{rule}"
        );
        let plain = Config::from_url("redis://127.0.0.1").expect("url");
        assert!(!plain.acl_rule("u", "p").expect("rule").contains("+role"));
    }

    #[test]
    fn confines_keys_and_channels_to_the_scope() {
        let rule = Config::default()
            .namespace("orders")
            .db(5)
            .acl_rule("u", "p@:%")
            .expect("rule");
        let words: Vec<&str> = rule.split(' ').collect();
        assert_eq!(&words[..5], ["ACL", "SETUSER", "u", "on", ">p@:%"]);
        assert!(words.contains(&"~{orders:5}:*"));
        assert!(words.contains(&"~orders:5:claim:*"));
        assert!(words.contains(&"+set") && words.contains(&"+getdel"));
        assert!(words.contains(&"&orders:5:*"));
        assert!(words.contains(&"+select|5"));
        for denied in [
            "+info",
            "+keys",
            "+psubscribe",
            "+config",
            "+client|setname",
        ] {
            assert!(!words.contains(&denied), "{denied} in {rule}");
        }
        let cluster = Config::from_url("redis-cluster://h:1")
            .expect("url")
            .namespace("orders")
            .acl_rule("u", "p")
            .expect("rule");
        assert!(cluster.contains(" &orders:0:* &{orders:0}:events "));
        assert!(!cluster.contains("select") && !cluster.contains("+publish"));
    }

    #[test]
    fn refuses_what_would_not_paste() {
        let config = Config::default();
        for (user, password) in [("", "p"), ("u", ""), ("a b", "p"), ("u", "p w"), ("u", "'")] {
            assert!(matches!(
                config.acl_rule(user, password),
                Err(Error::Config(_))
            ));
        }
        assert!(config.clone().namespace("a*").acl_rule("u", "p").is_err());
    }
}
