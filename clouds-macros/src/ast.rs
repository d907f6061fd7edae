//! The model: what a `#[clouds::service]` trait says, borrowed from the syntax tree.
//!
//! Building the model never fails on a well-formed trait: it records what was written, including
//! what the macro does not support, so that `valid` can report every mistake on its own token.

use proc_macro2::{Span, TokenStream};
use syn::{
    Attribute, FnArg, GenericArgument, Ident, ItemTrait, LitStr, Pat, PatType, PathArguments,
    Receiver, ReturnType, TraitItem, TraitItemFn, Type, ext::IdentExt,
};

/// The attribute argument: `#[clouds::service("name")]`.
pub(crate) struct ServiceName {
    /// The literal as written, for error spans.
    pub(crate) lit: LitStr,
}

impl ServiceName {
    /// Reads the attribute's tokens: exactly one string literal without suffix.
    pub(crate) fn from_attr(attr: TokenStream) -> syn::Result<Self> {
        const USAGE: &str = "`#[clouds::service(\"name\")]`";
        if attr.is_empty() {
            // The attribute has no tokens of its own; the call site is the attribute itself.
            return Err(syn::Error::new(
                Span::call_site(),
                format!("missing service name: write {USAGE}"),
            ));
        }
        match syn::parse2::<LitStr>(attr.clone()) {
            Ok(lit) if lit.suffix().is_empty() => Ok(Self { lit }),
            _ => Err(syn::Error::new_spanned(
                attr,
                format!("expected the service name as one string literal: {USAGE}"),
            )),
        }
    }

    /// The name as it appears on the wire.
    pub(crate) fn value(&self) -> String {
        self.lit.value()
    }
}

/// The trait under the attribute.
pub(crate) struct Service<'a> {
    /// The trait exactly as written; its attributes, visibility and supertraits are kept.
    pub(crate) item: &'a ItemTrait,
    /// The methods, in declaration order.
    pub(crate) methods: Vec<Method<'a>>,
    /// Associated types, consts and macros: not supported, kept for error spans.
    pub(crate) others: Vec<&'a TraitItem>,
}

impl<'a> Service<'a> {
    pub(crate) fn from_syn(item: &'a ItemTrait) -> Self {
        let mut methods = Vec::new();
        let mut others = Vec::new();
        for trait_item in &item.items {
            match trait_item {
                TraitItem::Fn(method) => methods.push(Method::from_syn(method)),
                other => others.push(other),
            }
        }
        Self {
            item,
            methods,
            others,
        }
    }

    pub(crate) fn ident(&self) -> &'a Ident {
        &self.item.ident
    }
}

/// One trait method: becomes a client method and a server route.
pub(crate) struct Method<'a> {
    /// The method as written.
    pub(crate) item: &'a TraitItemFn,
    /// The first parameter when it is a receiver (`self`, `&self`, `self: Box<Self>`, ...).
    pub(crate) receiver: Option<&'a Receiver>,
    /// The parameters after the receiver.
    pub(crate) args: Vec<Arg<'a>>,
    pub(crate) ret: ReturnKind<'a>,
    /// The method's `#[clouds(..)]` attributes, as written (checked by `valid`, removed from
    /// everything generated).
    pub(crate) options: Vec<&'a Attribute>,
}

impl<'a> Method<'a> {
    fn from_syn(item: &'a TraitItemFn) -> Self {
        let mut inputs = item.sig.inputs.iter().peekable();
        let receiver = match inputs.peek() {
            Some(FnArg::Receiver(receiver)) => {
                inputs.next();
                Some(receiver)
            }
            _ => None,
        };
        // syn rejects a receiver anywhere but first, so the rest are typed parameters.
        let args = inputs
            .filter_map(|input| match input {
                FnArg::Typed(pat_type) => Some(Arg::from_syn(pat_type)),
                FnArg::Receiver(_) => None,
            })
            .collect();
        Self {
            item,
            receiver,
            args,
            ret: ReturnKind::from_syn(&item.sig.output),
            options: item.attrs.iter().filter(|attr| is_option(attr)).collect(),
        }
    }

    /// Whether the method is marked `#[clouds(once)]`: each call runs at most once, however
    /// often it is retried. (Only read once `valid` has accepted the options.)
    pub(crate) fn once(&self) -> bool {
        self.options.iter().any(|attr| {
            attr.parse_args::<Ident>()
                .is_ok_and(|option| option == "once")
        })
    }

    /// The method's attributes without its `#[clouds(..)]` options.
    pub(crate) fn plain_attrs(&self) -> Vec<&'a Attribute> {
        self.item
            .attrs
            .iter()
            .filter(|attr| !is_option(attr))
            .collect()
    }

    pub(crate) fn ident(&self) -> &'a Ident {
        &self.item.sig.ident
    }

    /// `"{service}.{method}"`, without the `r#` of a raw identifier.
    pub(crate) fn wire_name(&self, service: &str) -> String {
        format!("{service}.{}", self.ident().unraw())
    }
}

/// Whether an attribute is one of the macro's method options, `#[clouds(..)]`.
pub(crate) fn is_option(attr: &Attribute) -> bool {
    attr.path().is_ident("clouds")
}

/// One parameter after the receiver.
pub(crate) struct Arg<'a> {
    /// The parameter as written, for error spans.
    pub(crate) pat_type: &'a PatType,
    /// The bound name, when the pattern is a plain binding (`name` or `mut name`).
    pub(crate) ident: Option<&'a Ident>,
    pub(crate) ty: &'a Type,
    /// The type is `String`: the client takes `impl AsRef<str>` and sends a `&str`, which
    /// MessagePack encodes exactly like a `String`.
    pub(crate) text: bool,
}

impl<'a> Arg<'a> {
    fn from_syn(pat_type: &'a PatType) -> Self {
        let ident = match &*pat_type.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => Some(&pat.ident),
            _ => None,
        };
        Self {
            pat_type,
            ident,
            ty: &pat_type.ty,
            text: is_string(&pat_type.ty),
        }
    }
}

/// How a method's result travels.
pub(crate) enum ReturnKind<'a> {
    /// No `-> T`: the method returns `()`.
    Unit,
    /// `-> Result<T, E>` (any path ending in `Result`, two type arguments): the error `E` is the
    /// method's own, sent back to the caller as a value, distinct from transport errors.
    Result {
        ty: &'a Type,
        ok: &'a Type,
        err: &'a Type,
    },
    /// `-> Streaming<T>` (any path ending in `Streaming`, one type argument): a streaming
    /// method; `result` holds `V` and `E` when `T` is written `Result<V, E>` (an `Err` item
    /// ends the stream as a typed application error).
    Stream {
        ty: &'a Type,
        item: &'a Type,
        result: Option<(&'a Type, &'a Type)>,
    },
    /// Any other type, including aliases like `io::Result<T>` whose error type the macro
    /// cannot see.
    Value(&'a Type),
}

impl<'a> ReturnKind<'a> {
    fn from_syn(output: &'a ReturnType) -> Self {
        let ReturnType::Type(_, ty) = output else {
            return Self::Unit;
        };
        if let Some(Some(item)) = streaming_args(ty) {
            return Self::Stream {
                ty,
                item,
                result: result_args(item),
            };
        }
        match result_args(ty) {
            Some((ok, err)) => Self::Result { ty, ok, err },
            None => Self::Value(ty),
        }
    }

    /// The declared return type, `()` when none was written.
    pub(crate) fn ty(&self) -> TokenStream {
        match self {
            Self::Unit => quote::quote!(()),
            Self::Result { ty, .. } | Self::Stream { ty, .. } | Self::Value(ty) => {
                quote::ToTokens::to_token_stream(ty)
            }
        }
    }

    /// The declared return type, if one was written.
    pub(crate) fn written(&self) -> Option<&'a Type> {
        match self {
            Self::Unit => None,
            Self::Result { ty, .. } | Self::Stream { ty, .. } | Self::Value(ty) => Some(ty),
        }
    }
}

/// Looks through the invisible groups that `macro_rules!` wraps around `$t:ty` and parentheses.
fn peel(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(group) => ty = &group.elem,
            Type::Paren(paren) => ty = &paren.elem,
            _ => return ty,
        }
    }
}

/// `T` and `E` of a type written `Result<T, E>`, with any path prefix.
fn result_args(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(path) = peel(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(Some(ok)), Some(Some(err)), None) => Some((ok, err)),
        _ => None,
    }
}

/// For a type written `Streaming<..>` (any path prefix): `Some(Some(T))` with exactly one
/// type argument `T`, `Some(None)` with any other arguments (a mistake `valid.rs` reports),
/// `None` for other types.
pub(crate) fn streaming_args(ty: &Type) -> Option<Option<&Type>> {
    let Type::Path(path) = peel(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Streaming" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return Some(None);
    };
    let mut args = args.args.iter();
    Some(match (args.next(), args.next()) {
        (Some(GenericArgument::Type(item)), None) => Some(item),
        _ => None,
    })
}

/// Whether a type is written as `String` or one of its full paths.
fn is_string(ty: &Type) -> bool {
    const PATHS: [&[&str]; 3] = [
        &["String"],
        &["std", "string", "String"],
        &["alloc", "string", "String"],
    ];
    let Type::Path(path) = peel(ty) else {
        return false;
    };
    if path.qself.is_some()
        || path
            .path
            .segments
            .iter()
            .any(|segment| !segment.arguments.is_none())
    {
        return false;
    }
    let segments: Vec<String> = path
        .path
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    PATHS.iter().any(|expected| {
        // A bare `::String` would name a crate, not the prelude type.
        (expected.len() > 1 || path.path.leading_colon.is_none())
            && segments
                .iter()
                .map(String::as_str)
                .eq(expected.iter().copied())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    #[test]
    fn detects_string_paths() {
        let yes: [Type; 5] = [
            parse_quote!(String),
            parse_quote!(std::string::String),
            parse_quote!(::std::string::String),
            parse_quote!(alloc::string::String),
            parse_quote!(::alloc::string::String),
        ];
        for ty in &yes {
            assert!(is_string(ty), "{}", quote::quote!(#ty));
        }
        let no: [Type; 6] = [
            parse_quote!(::String),
            parse_quote!(str),
            parse_quote!(Option<String>),
            parse_quote!(my::String),
            parse_quote!(string::String),
            parse_quote!(Vec<u8>),
        ];
        for ty in &no {
            assert!(!is_string(ty), "{}", quote::quote!(#ty));
        }
    }

    #[test]
    fn classifies_return_types() {
        let item: ItemTrait = parse_quote! {
            trait T {
                async fn unit(&self);
                async fn explicit_unit(&self) -> ();
                async fn plain(&self) -> Result<i64, E>;
                async fn pathed(&self) -> ::core::result::Result<Vec<u8>, my::Error>;
                async fn alias(&self) -> io::Result<u8>;
                async fn three(&self) -> Result<u8, E, X>;
                async fn value(&self) -> Option<u8>;
            }
        };
        let service = Service::from_syn(&item);
        let kinds: Vec<&str> = service
            .methods
            .iter()
            .map(|method| match method.ret {
                ReturnKind::Unit => "unit",
                ReturnKind::Result { .. } => "result",
                ReturnKind::Stream { .. } => "stream",
                ReturnKind::Value(_) => "value",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "unit", "value", "result", "result", "value", "value", "value"
            ]
        );
        let ReturnKind::Result { ok, err, .. } = &service.methods[3].ret else {
            panic!("expected a result");
        };
        assert_eq!(quote::quote!(#ok).to_string(), "Vec < u8 >");
        assert_eq!(quote::quote!(#err).to_string(), "my :: Error");
    }

    #[test]
    fn splits_receiver_and_args() {
        let item: ItemTrait = parse_quote! {
            trait T {
                async fn m(&self, a: String, mut b: u8, (c, d): (u8, u8));
                async fn n(x: u8);
                type Assoc;
            }
        };
        let service = Service::from_syn(&item);
        assert_eq!(service.others.len(), 1);
        let m = &service.methods[0];
        assert!(m.receiver.is_some());
        let names: Vec<Option<String>> = m
            .args
            .iter()
            .map(|arg| arg.ident.map(Ident::to_string))
            .collect();
        assert_eq!(names, [Some("a".into()), Some("b".into()), None]);
        assert!(m.args[0].text);
        assert!(!m.args[1].text);
        assert!(service.methods[1].receiver.is_none());
        assert_eq!(service.methods[1].args.len(), 1);
    }

    #[test]
    fn wire_name_drops_raw_prefix() {
        let item: ItemTrait = parse_quote! {
            trait T { async fn r#type(&self); }
        };
        let service = Service::from_syn(&item);
        assert_eq!(service.methods[0].wire_name("svc"), "svc.type");
    }

    #[test]
    fn attribute_must_be_one_string() {
        let name = ServiceName::from_attr(quote::quote!("test")).expect("valid name");
        assert_eq!(name.value(), "test");
        for attr in [
            quote::quote!(),
            quote::quote!(test),
            quote::quote!("a", "b"),
            quote::quote!(name = "a"),
            quote::quote!(b"a"),
            quote::quote!("a"suffix),
        ] {
            assert!(ServiceName::from_attr(attr.clone()).is_err(), "{attr}");
        }
    }
}
