//! Enums named by a word on the command line and in files (`l2`, `fp32`, `pad`, `train`):
//! [`named!`](crate::named) writes their `as_str`, `FromStr` (with the one "expected a, b or c"
//! message) and `Display` from one list of names.

/// "a", "a or b", "a, b or c".
pub fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// `named!(Type { Variant => "name", ... })`.
#[macro_export]
macro_rules! named {
    ($ty:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$v => $s),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                $(if s == $s {
                    return Ok($ty::$v);
                })+
                Err(format!("'{s}': expected {}", $crate::names::one_of(&[$($s),+])))
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::one_of;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fruit {
        Apple,
        Pear,
        Fig,
    }
    crate::named!(Fruit { Apple => "apple", Pear => "pear", Fig => "fig" });

    #[test]
    fn names_round_trip_and_errors_list_them() {
        assert_eq!(one_of(&["a", "b"]), "a or b");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
        for f in [Fruit::Apple, Fruit::Pear, Fruit::Fig] {
            assert_eq!(f.to_string().parse::<Fruit>(), Ok(f));
        }
        assert_eq!(
            "plum".parse::<Fruit>(),
            Err("'plum': expected apple, pear or fig".to_string())
        );
    }
}
