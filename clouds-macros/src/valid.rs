//! Checks that a service can be generated: every unsupported construct becomes an error on the
//! token that caused it, and all of them are reported at once.

use std::collections::HashSet;
use std::fmt::Display;

use quote::{ToTokens, quote};
use syn::{
    GenericArgument, Lifetime, Path, PathArguments, Receiver, TraitItem, Type, TypeParamBound,
    punctuated::Punctuated, token::Plus,
};

use crate::ast::{Method, ReturnKind, Service, ServiceName};

/// Names of the generated client's own methods, and of the trait methods it implements
/// (`Clone::clone`, `Debug::fmt`): an inherent method of that name would shadow them, so
/// `hello.clone()` would make a remote call.
const RESERVED: [&str; 5] = ["new", "with_retries", "with_timeout", "clone", "fmt"];

/// Collects errors so that one expansion reports every mistake, each on its own token.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(first) => first.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Checks the service name given to the attribute.
pub(crate) fn check_name(name: &ServiceName, errors: &mut Errors) {
    let value = name.value();
    let problem = if value.is_empty() {
        "the service name cannot be empty"
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "the service name cannot contain whitespace or control characters"
    } else if value.contains('.') {
        "the service name cannot contain `.`: it separates service and method in wire names (`service.method`)"
    } else if value.contains(['{', '}']) {
        "the service name cannot contain `{` or `}`: Redis Cluster reads them as a hash tag in keys"
    } else {
        return;
    };
    errors.spanned(&name.lit, problem);
}

/// Longest wire name the runtime accepts, in bytes: wire names become parts of Redis keys.
const MAX_WIRE_NAME: usize = 256;

/// Checks that each `"{service}.{method}"` fits the runtime's limit, so that a name too long
/// fails here instead of when the server starts.
pub(crate) fn check_wire_names(name: &ServiceName, service: &Service<'_>, errors: &mut Errors) {
    let name = name.value();
    for method in &service.methods {
        let wire = method.wire_name(&name);
        if wire.len() > MAX_WIRE_NAME {
            errors.spanned(
                method.ident(),
                format!(
                    "the wire name `{wire}` is {} bytes long; shorten the service or method name to fit {MAX_WIRE_NAME}",
                    wire.len()
                ),
            );
        }
    }
}

/// Checks the trait and each of its methods.
pub(crate) fn check_service(service: &Service<'_>, errors: &mut Errors) {
    let item = service.item;
    if let Some(unsafety) = &item.unsafety {
        errors.spanned(unsafety, "a service trait cannot be `unsafe`");
    }
    if let Some(auto) = &item.auto_token {
        errors.spanned(auto, "a service trait cannot be an `auto` trait");
    }
    if !item.generics.params.is_empty() {
        errors.spanned(
            &item.generics,
            "a service trait cannot be generic: the client and server need concrete types to (de)serialize",
        );
    }
    if let Some(where_clause) = &item.generics.where_clause {
        errors.spanned(
            where_clause,
            "a service trait cannot have a `where` clause; put bounds on the implementation instead",
        );
    }
    for other in &service.others {
        let what = match other {
            TraitItem::Const(_) => "associated consts",
            TraitItem::Type(_) => "associated types",
            TraitItem::Macro(_) => "macro invocations",
            _ => "items other than methods",
        };
        errors.spanned(
            other,
            format!(
                "a service trait can only contain `async fn` methods, not {what}: the client has no implementation to take them from"
            ),
        );
    }

    for method in &service.methods {
        let ident = method.ident();
        if RESERVED.iter().any(|reserved| ident == reserved) {
            errors.spanned(
                ident,
                format!(
                    "`{ident}` is reserved: the generated `{}Client` has its own `{ident}` method (or trait method); rename this one",
                    service.ident()
                ),
            );
        }
        check_method(method, errors);
    }
}

fn check_method(method: &Method<'_>, errors: &mut Errors) {
    let sig = &method.item.sig;
    if let Some(constness) = &sig.constness {
        errors.spanned(constness, "a service method cannot be `const`");
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.spanned(unsafety, "a service method cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, "a service method cannot have an `extern` ABI");
    }
    if sig.asyncness.is_none() {
        let fn_token = &sig.fn_token;
        let ident = &sig.ident;
        errors.spanned(
            quote!(#fn_token #ident),
            format!("a service method must be `async fn`: write `async fn {ident}`"),
        );
    }
    if !sig.generics.params.is_empty() {
        errors.spanned(
            &sig.generics,
            "a service method cannot be generic: the server needs concrete types to deserialize",
        );
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        errors.spanned(
            where_clause,
            "a service method cannot have a `where` clause",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, "a service method cannot be variadic");
    }
    check_options(method, errors);

    match method.receiver {
        Some(receiver) => check_receiver(receiver, errors),
        None => errors.push(syn::Error::new(
            sig.paren_token.span.join(),
            "a service method must take `&self` as its first parameter",
        )),
    }

    let mut names = HashSet::new();
    for arg in &method.args {
        if !arg.pat_type.attrs.is_empty() {
            errors.spanned(
                &arg.pat_type.attrs[0],
                "attributes on service method parameters are not supported",
            );
        }
        match arg.ident {
            Some(ident) => {
                // With a body, the compiler reports the duplicate itself: see `left_to_compiler`.
                if !names.insert(ident.to_string()) && method.item.default.is_none() {
                    errors.spanned(ident, format!("duplicate parameter `{ident}`"));
                }
            }
            None => errors.spanned(
                &arg.pat_type.pat,
                "a service method parameter must be a plain name (`name: Type`): the generated client takes it by that name",
            ),
        }
        check_type(arg.ty, Place::Arg, errors);
    }
    if let Some(ty) = method.ret.written() {
        check_type(ty, Place::Return, errors);
        if let Some(None) = crate::ast::streaming_args(ty) {
            errors.spanned(
                ty,
                "a streaming method returns `clouds::Streaming<T>`, with exactly one type: the item (`Streaming<Result<T, E>>` for items that can fail)",
            );
        }
    }
}

/// The options a method may carry, `#[clouds(option)]`.
const OPTIONS: &str =
    "`#[clouds(once)]` (each call runs at most once, however often it is retried)";

/// Checks the method's `#[clouds(..)]` attributes: each one names one known option, once.
fn check_options(method: &Method<'_>, errors: &mut Errors) {
    let mut once = None;
    for attr in &method.options {
        let option = match &attr.meta {
            syn::Meta::List(list) => syn::parse2::<syn::Ident>(list.tokens.clone()).ok(),
            _ => None,
        };
        match option {
            Some(option) if option == "once" => {
                if once.replace(option).is_some() {
                    errors.spanned(attr, "`#[clouds(once)]` is given twice; once is enough");
                } else if matches!(method.ret, ReturnKind::Stream { .. }) {
                    // A stream's items are not a result that a record could hand to a retry.
                    errors.spanned(
                        attr,
                        "`#[clouds(once)]` is for methods that return one result: a streaming method is never retried once it has sent an item, and a record of it could not replay its items",
                    );
                }
            }
            Some(option) if option == "idempotent" => errors.spanned(
                &option,
                "unknown option `idempotent`: to make retries run a method at most once, write `#[clouds(once)]` (it makes a method that is not idempotent safe to retry)",
            ),
            Some(option) => errors.spanned(
                &option,
                format!("unknown option `{option}`: the method options are {OPTIONS}"),
            ),
            None => errors.spanned(
                attr,
                format!("expected one option in parentheses: {OPTIONS}"),
            ),
        }
    }
}

fn check_receiver(receiver: &Receiver, errors: &mut Errors) {
    let message = match (&receiver.reference, &receiver.mutability) {
        _ if receiver.colon_token.is_some() => {
            "a service method must take exactly `&self`, without an explicit type"
        }
        (Some((_, Some(lifetime))), _) => {
            errors.spanned(
                lifetime,
                "a service method must take `&self` without a named lifetime",
            );
            return;
        }
        (Some(_), None) => return,
        (Some(_), Some(_)) => {
            "a service method must take `&self`, not `&mut self`: the server calls one implementation concurrently; keep mutable state behind a lock"
        }
        (None, _) => {
            "a service method must take `&self`, not `self`: the server keeps the implementation and calls it many times"
        }
    };
    errors.spanned(receiver, message);
}

/// Mistakes the compiler reports by itself on the trait as written: duplicate method names, and
/// duplicate parameter names in a method with a body. The macro adds no error of its own for
/// these and generates nothing beside the trait, so each mistake is reported exactly once.
pub(crate) fn left_to_compiler(service: &Service<'_>) -> bool {
    let mut methods = HashSet::new();
    service.methods.iter().any(|method| {
        let mut args = HashSet::new();
        !methods.insert(method.ident())
            || (method.item.default.is_some()
                && method
                    .args
                    .iter()
                    .filter_map(|arg| arg.ident)
                    .any(|ident| !args.insert(ident)))
    })
}

/// Where a type appears, to word errors.
#[derive(Clone, Copy)]
enum Place {
    Arg,
    Return,
}

impl Place {
    fn noun(self) -> &'static str {
        match self {
            Self::Arg => "parameter",
            Self::Return => "return type",
        }
    }
}

/// Rejects what cannot cross the wire or be named outside the trait: references, `impl Trait`,
/// lifetimes other than `'static`, and `Self`.
fn check_type(ty: &Type, place: Place, errors: &mut Errors) {
    match ty {
        Type::Reference(_) => errors.spanned(
            ty,
            format!(
                "a service method {} cannot be a reference: values are (de)serialized, so use an owned type (`String`, `Vec<T>`, ...)",
                place.noun()
            ),
        ),
        Type::ImplTrait(_) => errors.spanned(
            ty,
            format!(
                "a service method {} cannot use `impl Trait`: the server needs a concrete type to (de)serialize",
                place.noun()
            ),
        ),
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                check_type(&qself.ty, place, errors);
            }
            check_path(&path.path, path.qself.is_none(), place, errors);
        }
        Type::Array(array) => check_type(&array.elem, place, errors),
        Type::Group(group) => check_type(&group.elem, place, errors),
        Type::Paren(paren) => check_type(&paren.elem, place, errors),
        Type::Ptr(ptr) => check_type(&ptr.elem, place, errors),
        Type::Slice(slice) => check_type(&slice.elem, place, errors),
        Type::Tuple(tuple) => {
            for elem in &tuple.elems {
                check_type(elem, place, errors);
            }
        }
        Type::TraitObject(object) => check_bounds(&object.bounds, place, errors),
        // Function pointers, `!`, macros and `_` are left to the compiler.
        _ => {}
    }
}

fn check_path(path: &Path, first_is_free: bool, place: Place, errors: &mut Errors) {
    if let Some(first) = path.segments.first()
        && first_is_free
        && path.leading_colon.is_none()
        && first.ident == "Self"
    {
        errors.spanned(
            &first.ident,
            format!(
                "a service method {} cannot mention `Self`: the client and server do not know the implementing type; name the concrete type",
                place.noun()
            ),
        );
    }
    for segment in &path.segments {
        // `Fn(&T) -> U` sugar (parenthesized arguments) describes a callable, which never crosses
        // the wire anyway: left to the compiler.
        let PathArguments::AngleBracketed(args) = &segment.arguments else {
            continue;
        };
        for arg in &args.args {
            match arg {
                GenericArgument::Lifetime(lifetime) => check_lifetime(lifetime, place, errors),
                GenericArgument::Type(ty) => check_type(ty, place, errors),
                GenericArgument::AssocType(assoc) => check_type(&assoc.ty, place, errors),
                GenericArgument::Constraint(constraint) => {
                    check_bounds(&constraint.bounds, place, errors);
                }
                _ => {}
            }
        }
    }
}

fn check_bounds(bounds: &Punctuated<TypeParamBound, Plus>, place: Place, errors: &mut Errors) {
    for bound in bounds {
        match bound {
            TypeParamBound::Lifetime(lifetime) => check_lifetime(lifetime, place, errors),
            TypeParamBound::Trait(bound) => {
                if let Some(lifetimes) = &bound.lifetimes {
                    errors.spanned(
                        lifetimes,
                        format!(
                            "a service method {} cannot have lifetimes: values are deserialized into owned data",
                            place.noun()
                        ),
                    );
                }
                check_path(&bound.path, true, place, errors);
            }
            _ => {}
        }
    }
}

fn check_lifetime(lifetime: &Lifetime, place: Place, errors: &mut Errors) {
    // `'static` is harmless: such types own their data (e.g. `Cow<'static, str>`).
    if lifetime.ident != "static" {
        errors.spanned(
            lifetime,
            format!(
                "a service method {} cannot have lifetimes other than `'static`: values are deserialized into owned data",
                place.noun()
            ),
        );
    }
}

/// Error messages of a failed check, in order; empty when the check passed.
#[cfg(test)]
pub(crate) fn messages(result: syn::Result<()>) -> Vec<String> {
    match result {
        Ok(()) => Vec::new(),
        Err(error) => error.into_iter().map(|error| error.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::{ItemTrait, parse_quote};

    fn check(item: ItemTrait) -> Vec<String> {
        let mut errors = Errors::default();
        check_service(&Service::from_syn(&item), &mut errors);
        messages(errors.finish())
    }

    fn check_name_str(name: &str) -> Vec<String> {
        let mut errors = Errors::default();
        let name = ServiceName::from_attr(quote!(#name)).expect("a string literal");
        check_name(&name, &mut errors);
        messages(errors.finish())
    }

    /// Asserts one error per entry, each containing the given fragment.
    #[track_caller]
    fn assert_errors(actual: &[String], expected: &[&str]) {
        assert_eq!(actual.len(), expected.len(), "{actual:#?}");
        for (actual, expected) in actual.iter().zip(expected) {
            assert!(actual.contains(expected), "{actual:?} lacks {expected:?}");
        }
    }

    #[test]
    fn accepts_a_good_service() {
        let errors = check(parse_quote! {
            /// Docs.
            pub trait Hello: Send + Sync {
                /// Greets.
                async fn hello(&self, name: String, mut msg: String) -> String;
                async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
                async fn ping(&self);
                async fn cow(&self, text: Cow<'static, str>) -> Box<dyn Error + Send + 'static>;
                async fn with_default(&self) -> u8 { 1 }
            }
        });
        assert_errors(&errors, &[]);
    }

    #[test]
    fn service_names() {
        assert_errors(&check_name_str("test"), &[]);
        assert_errors(&check_name_str("my-svc_2:v1"), &[]);
        assert_errors(&check_name_str(""), &["empty"]);
        assert_errors(&check_name_str("a b"), &["whitespace"]);
        assert_errors(&check_name_str("a\tb"), &["whitespace"]);
        assert_errors(&check_name_str("a.b"), &["`.`"]);
        assert_errors(&check_name_str("a{b}"), &["hash tag"]);
    }

    #[test]
    fn wire_names_fit() {
        let long = format!("m{}", "x".repeat(252));
        let item: ItemTrait = syn::parse_str(&format!(
            "trait Hello {{ async fn short(&self); async fn {long}(&self); }}"
        ))
        .expect("a trait");
        let service = Service::from_syn(&item);
        let check = |name: &str| {
            let name = ServiceName::from_attr(quote!(#name)).expect("a name");
            let mut errors = Errors::default();
            check_wire_names(&name, &service, &mut errors);
            messages(errors.finish())
        };
        assert_errors(&check("sv"), &[]);
        assert_errors(&check("svc"), &["is 257 bytes long"]);
    }

    #[test]
    fn rejects_trait_shapes() {
        let errors = check(parse_quote! {
            unsafe trait Hello<T> where T: Clone {
                type Assoc;
                const N: usize;
                m!();
                async fn ok(&self);
            }
        });
        assert_errors(
            &errors,
            &[
                "cannot be `unsafe`",
                "cannot be generic",
                "`where` clause",
                "associated types",
                "associated consts",
                "macro invocations",
            ],
        );
    }

    #[test]
    fn rejects_receivers() {
        let errors = check(parse_quote! {
            trait Hello {
                async fn a(&mut self);
                async fn b(self);
                async fn c(self: Box<Self>);
                async fn d(x: u8);
                async fn e();
                async fn f(&'a self);
                async fn g(self: &Self);
            }
        });
        assert_errors(
            &errors,
            &[
                "not `&mut self`",
                "not `self`",
                "without an explicit type",
                "first parameter",
                "first parameter",
                "named lifetime",
                "without an explicit type",
            ],
        );
    }

    #[test]
    fn rejects_signatures() {
        let errors = check(parse_quote! {
            trait Hello {
                fn not_async(&self);
                async fn generic<T>(&self, t: T);
                async fn bounded(&self) where Self: Sized;
                const async fn konst(&self);
                async unsafe fn unsafe_(&self);
                async extern "C" fn ext(&self);
            }
        });
        assert_errors(
            &errors,
            &[
                "must be `async fn`",
                "cannot be generic",
                "`where` clause",
                "`const`",
                "`unsafe`",
                "`extern`",
            ],
        );
    }

    #[test]
    fn rejects_arguments() {
        let errors = check(parse_quote! {
            trait Hello {
                async fn m(
                    &self,
                    (a, b): (u8, u8),
                    _: u8,
                    ref c: u8,
                    d: &str,
                    e: impl Display,
                    f: Vec<&'a str>,
                    g: Cow<'_, str>,
                    h: Self,
                    i: Vec<<Self as Tr>::X>,
                    j: Box<dyn for<'x> Fn(&'x u8)>,
                    #[cfg(x)] k: u8,
                    l: u8,
                    l: u8,
                );
            }
        });
        assert_errors(
            &errors,
            &[
                "plain name",
                "plain name",
                "plain name",
                "cannot be a reference",
                "`impl Trait`",
                "cannot be a reference",
                "other than `'static`",
                "`Self`",
                "`Self`",
                "cannot have lifetimes",
                "attributes on service method parameters",
                "duplicate parameter `l`",
            ],
        );
    }

    #[test]
    fn rejects_return_types() {
        let errors = check(parse_quote! {
            trait Hello {
                async fn a(&self) -> &str;
                async fn b(&self) -> impl Display;
                async fn c(&self) -> Result<Self, E>;
                async fn d(&self) -> Option<Cow<'a, str>>;
            }
        });
        assert_errors(
            &errors,
            &[
                "return type cannot be a reference",
                "return type cannot use `impl Trait`",
                "return type cannot mention `Self`",
                "return type cannot have lifetimes",
            ],
        );
    }

    #[test]
    fn leaves_duplicates_to_the_compiler() {
        let item: ItemTrait = parse_quote! {
            trait Hello {
                async fn twice(&self);
                async fn twice(&self, a: u8);
            }
        };
        assert!(left_to_compiler(&Service::from_syn(&item)));
        assert_errors(&check(item), &[]);

        let item: ItemTrait = parse_quote! {
            trait Hello {
                async fn body(&self, a: u8, a: u8) {}
            }
        };
        assert!(left_to_compiler(&Service::from_syn(&item)));
        assert_errors(&check(item), &[]);

        // Without a body, the compiler accepts duplicate parameters: the macro reports them.
        let item: ItemTrait = parse_quote! {
            trait Hello {
                async fn bodyless(&self, a: u8, a: u8);
            }
        };
        assert!(!left_to_compiler(&Service::from_syn(&item)));
        assert_errors(&check(item), &["duplicate parameter `a`"]);
    }

    #[test]
    fn rejects_reserved_names() {
        let errors = check(parse_quote! {
            trait Hello {
                async fn new(&self);
                async fn with_retries(&self);
                async fn with_timeout(&self);
                async fn clone(&self);
                async fn fmt(&self);
            }
        });
        assert_errors(
            &errors,
            &[
                "`new` is reserved: the generated `HelloClient`",
                "`with_retries` is reserved",
                "`with_timeout` is reserved",
                "`clone` is reserved",
                "`fmt` is reserved",
            ],
        );
    }

    #[test]
    fn reports_each_mistake_once() {
        let errors = check(parse_quote! {
            trait Hello {
                fn a(&mut self);
            }
        });
        assert_errors(&errors, &["must be `async fn`", "not `&mut self`"]);
    }
}
