//! Internal macros.

/// Defines an enum whose wire form is a string and which keeps values this crate does not know
/// (a newer QEMU's) in an `Other(String)` variant instead of failing to decode.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this crate does not know (sent by a newer QEMU), kept verbatim.
            Other(String),
        }

        impl $name {
            /// The wire spelling of the value.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $wire, )*
                    $name::Other(s) => s.as_str(),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $( $wire => $name::$variant, )*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok($name::from(s.as_str()))
            }
        }
    };
}

/// Defines a command marker type and its [`crate::cmd::Command`] impl.
macro_rules! command {
    (
        $(#[$meta:meta])*
        $name:ident = $wire:literal ($args:ty) -> $ret:ty, since ($maj:literal, $min:literal)
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name;

        impl $crate::cmd::Command for $name {
            const NAME: &'static str = $wire;
            type Args = $args;
            type Returns = $ret;
            const SINCE: (u32, u32) = ($maj, $min);
        }
    };
}
