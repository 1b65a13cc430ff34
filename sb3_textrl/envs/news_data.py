"""
News summarization data: a seeded generator of synthetic articles (the built-in default data) and a loader for
real corpora from a local JSONL/JSON/CSV file or, where the Hugging Face hub is reachable, through ``datasets``.

Every name, place, company and number in the generated articles is invented; the templates are written for this
project. The reference summary of a generated article restates its key facts (who, what, where, how many), so a
ROUGE reward pays for mentioning them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sb3_textrl.common.text_files import jsonl_lines, read_text_file

# ----------------------------------------------------------------------------------------------------------------
# Synthetic articles
# ----------------------------------------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names -> tuple (keeps these long lists compact under the formatter)."""
    return tuple(name.strip() for name in text.split(","))


_FEMALE_NAMES = _names(
    "Alma, Celia, Elspeth, Greta, Ines, Keziah, Maren, Orla, Rosalind, Tamsin, Vesna, Yara, Anouk, "
    "Cordelia, Edda, Hester, Juno, Lenora, Nell, Priya, Saskia, Wren, Ottilie, Romilly"
)
_MALE_NAMES = _names(
    "Bram, Dorian, Farid, Hollis, Jonah, Lorcan, Nikolai, Pieter, Soren, Ulric, Wendell, Zeno, Bastian, "
    "Desmond, Florian, Gideon, Ivo, Kasimir, Matthias, Osric, Rufus, Teodor, Quentin"
)
_FIRST_NAMES = _FEMALE_NAMES + _MALE_NAMES
_LAST_NAMES = _names(
    "Ashcombe, Brennick, Calloway, Dunstable, Everleigh, Fairhurst, Galloway, Hartigan, Ingleby, Jessop, "
    "Kilbride, Lockwood, Marchetti, Nettleford, Ormsby, Pembridge, Quarrie, Rusholme, Stannard, "
    "Thistlewood, Underhill, Varga, Whitcombe, Yelland, Abernathy, Brightman, Coventry, Delacroix, "
    "Emberton, Fallowfield, Greaves, Holloway, Iredale, Kettering, Larkin, Morrow, Northcott, Okonkwo, "
    "Penhallow, Radcliffe, Sandoval, Trelawney, Vickery, Wakefield, Zielinski"
)
_TOWNS = _names(
    "Eastbrook, Marrowfield, Kestrel Bay, Hollins Cross, Wexmoor, Ardley Vale, Tamsford, Brindlewick, "
    "Carrow Point, Lynhurst, Oakhaven, Saltmere, Fenwold, Redmarsh, Glenrith, Dunmore Heath, Pellington, "
    "Ravensholt, Whitlow, Corbridge Down, Ashby Ferrers, Millhaven, Norcaster, Thornwick"
)
_REGIONS = _names(
    "Northmere, Westvale, the Calder Lowlands, the Harrow Coast, Upper Tamsdale, the Fenmarch, "
    "South Aldery, the Brackenridge Hills"
)
_WORKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_WEEKDAYS = (*_WORKDAYS, "Saturday", "Sunday")
_CURRENCIES = ("£", "$", "€")


def _person(rng: random.Random, female: bool | None = None) -> str:
    """An invented full name; ``female`` picks the first-name list (random when ``None``)."""
    if female is None:
        female = rng.random() < 0.5
    return f"{rng.choice(_FEMALE_NAMES if female else _MALE_NAMES)} {rng.choice(_LAST_NAMES)}"


def _people(rng: random.Random, n: int) -> list[tuple[str, bool]]:
    """``n`` invented people with distinct surnames, as ``(name, is_female)``."""
    people = []
    for surname in rng.sample(_LAST_NAMES, n):
        female = rng.random() < 0.5
        people.append((f"{rng.choice(_FEMALE_NAMES if female else _MALE_NAMES)} {surname}", female))
    return people


def _ordinal(n: int) -> str:
    """61 -> '61st', 72 -> '72nd', 11 -> '11th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_SMALL_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _number(n: int) -> str:
    """Newspaper style: words below ten, digits with thousands separators from ten up."""
    return _SMALL_NUMBERS[n] if 0 <= n < 10 else f"{n:,}"


def _money(currency: str, millions: float) -> str:
    """Amount in millions -> '£4.2 million' / '$1.3 billion'."""
    if millions >= 1000:
        return f"{currency}{millions / 1000:.1f} billion"
    if millions >= 10:
        return f"{currency}{millions:.0f} million"
    return f"{currency}{millions:.1f} million"


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


# A story is: the lead sentence, core sentences that always follow it (in order), optional sentences (details,
# quotes, background) of which a random subset is kept in their written order, and the reference summary.
_Story = tuple[str, list[str], list[str], str]


def _council_vote(rng: random.Random) -> _Story:
    town = rng.choice(_TOWNS)
    day = rng.choice(_WORKDAYS)
    (leader, leader_female), (opponent, _), (resident, _) = _people(rng, 3)
    currency = rng.choice(_CURRENCIES)
    cost = round(rng.uniform(1.5, 48.0), 1)
    homes = rng.randrange(120, 1500, 10)
    proposal, detail, objection = rng.choice(
        (
            (
                f"a plan to build {homes:,} new homes on the former railway yard",
                f"The development would include a primary school, a health centre and a small park, and about a "
                f"third of the {homes:,} homes would be offered at below market rents.",
                "traffic on roads that are already congested at rush hour",
            ),
            (
                f"a {_money(currency, cost)} network of protected cycle lanes across the town centre",
                "The lanes would link the railway station, the hospital and the main shopping streets, and some "
                "on-street parking spaces would be removed to make room for them.",
                "the loss of parking spaces outside small shops",
            ),
            (
                f"the closure of {_number(rng.randint(2, 5))} branch libraries to save "
                f"{_money(currency, round(cost / 10, 1))} a year",
                "Book collections would move to a single central library with longer opening hours, and a mobile "
                "library van would visit outlying villages once a week.",
                "older residents who cannot easily travel into the town centre",
            ),
            (
                f"a {rng.randint(10, 45)} per cent rise in town centre parking charges",
                "The extra income is meant to pay for road repairs and a free weekend bus service, according to a "
                "report presented to the meeting by council officers.",
                "shoppers being driven away to out-of-town retail parks",
            ),
            (
                f"a new {_money(currency, cost)} public swimming pool on the site of the old leisure centre",
                "The pool would have eight lanes, a learner pool for children and a gym, and it would be heated "
                "using solar panels on the roof.",
                "the cost at a time when other services are being cut",
            ),
        )
    )
    votes_for = rng.randint(6, 21)
    votes_against = rng.randint(1, votes_for - 1)
    lead = _pick(
        rng,
        f"Councillors in {town} voted {votes_for} to {votes_against} on {day} to approve {proposal}, ending months "
        f"of debate over the scheme.",
        f"{town} council has approved {proposal} after a vote of {votes_for} to {votes_against} at a packed "
        f"meeting on {day} evening.",
        f"A divided {town} council on {day} backed {proposal}, with {votes_for} members voting in favour and "
        f"{votes_against} against.",
    )
    core = [
        detail,
        f'Council leader {leader} said the decision was "the right one for the next generation" and promised '
        f"that residents would be kept informed as the work went ahead.",
    ]
    optional = [
        f"Opposition councillor {opponent} called the vote rushed and said people had not been given enough time "
        f"to study the details, raising concerns about {objection}.",
        f"More than {rng.randrange(200, 4000, 50):,} people responded to a public consultation last year, and a "
        f"majority of them said they supported the idea in principle.",
        f'Local resident {resident} told the meeting that {town} "could not afford to stand still" while '
        f"neighbouring towns were investing heavily.",
        f"Work is expected to begin in {rng.choice(('the spring', 'the autumn', 'early next year', 'the summer'))} "
        f"and to take about {_number(rng.randint(2, 4))} years to complete, according to the council.",
        f"The proposal was first put forward {_number(rng.randint(2, 9))} years ago but stalled several times "
        f"because the council could not agree on how to pay for it.",
        f"A group of residents has said it will ask the regional authority for {rng.choice(_REGIONS)} to review the "
        f"decision before any work starts.",
        f"{'She' if leader_female else 'He'} added that the council had listened to objections and changed parts of "
        f"the plan as a result.",
        "Several people in the public gallery applauded when the result of the vote was announced, while others "
        "left the chamber in protest.",
    ]
    summary = _pick(
        rng,
        f"{town} council voted {votes_for} to {votes_against} to approve {proposal}.",
        f"Councillors in {town} have approved {proposal} by {votes_for} votes to {votes_against}.",
    )
    if rng.random() < 0.5:
        summary += f" Council leader {leader} called it the right decision, but opponents said it was rushed."
    return lead, core, optional, summary


def _earnings(rng: random.Random) -> _Story:
    brand = rng.choice(("Halvern", "Brightwater", "Corvane", "Tidewell", "Larkspur", "Norwick", "Quillon", "Sablecrest"))
    sector, products = rng.choice(
        (
            ("Foods", "ready meals and snacks"),
            ("Systems", "payment terminals"),
            ("Logistics", "parcel delivery"),
            ("Energy", "household gas and electricity"),
            ("Pharmaceuticals", "prescription medicines"),
            ("Motors", "electric vans"),
            ("Software", "accounting software"),
            ("Retail", "home furnishings"),
        )
    )
    company = f"{brand} {sector}"
    (boss, _), (analyst, _) = _people(rng, 2)
    currency = rng.choice(_CURRENCIES)
    period = rng.choice(("first-quarter", "second-quarter", "third-quarter", "full-year", "half-year"))
    revenue = round(rng.uniform(80, 9000), 1)
    up = rng.random() < 0.55
    change = rng.randint(3, 38)
    profit = round(revenue * rng.uniform(0.03, 0.2), 1)
    share_move = round(rng.uniform(1.0, 14.0), 1)
    jobs = rng.randrange(100, 3000, 50)
    hq = rng.choice(_TOWNS)
    direction = "rose" if up else "fell"
    if up:
        reason = rng.choice(
            (
                "strong demand for its new product range",
                "growth in overseas sales",
                "higher prices",
                "a large government contract",
            )
        )
    else:
        reason = rng.choice(
            (
                "weaker consumer spending",
                "rising energy costs",
                "the loss of a major customer",
                "supply problems at its main factory",
            )
        )
    lead = _pick(
        rng,
        f"{company}, the {products} firm based in {hq}, said on {rng.choice(_WORKDAYS)} that its {period} revenue "
        f"{direction} {change} per cent to {_money(currency, revenue)}.",
        f"{period.capitalize()} revenue at {company} {direction} by {change} per cent to {_money(currency, revenue)}, "
        f"the {hq}-based {products} company reported on {rng.choice(_WORKDAYS)}.",
    )
    core = [
        f"The company said the {'increase' if up else 'fall'} was mainly driven by {reason}, and that it had "
        f"{'seen the trend continue' if up else 'not yet seen signs of a recovery'} in recent weeks.",
        f"Pre-tax profit for the period was {_money(currency, profit)}, "
        f"{'ahead of' if up else 'below'} what most analysts had expected.",
    ]
    optional = [
        f"Shares in {company} {'rose' if up else 'dropped'} {share_move} per cent in early trading as investors "
        f"reacted to the figures.",
        f"Chief executive {boss} said the results showed the business was "
        f'"{"moving in the right direction" if up else "facing a difficult market"}" and that the company had a '
        f"clear plan for the year ahead.",
        (
            f"The firm plans to hire about {jobs:,} more staff over the next year, most of them at its sites in "
            f"{hq} and {rng.choice(_REGIONS)}."
            if up
            else f"The firm confirmed it will cut about {jobs:,} jobs as part of a cost-saving plan, although it "
            f"hopes most will go through voluntary redundancy."
        ),
        f"Analyst {analyst} said investors would be watching closely to see whether the "
        f"{'growth' if up else 'slowdown'} continues into next year, given the uncertain economic outlook.",
        f"{company} employs around {rng.randrange(2000, 40000, 500):,} people and has had its headquarters in {hq} "
        f"since it was founded {rng.randint(12, 90)} years ago.",
        f"The company will pay a dividend of {rng.randint(10, 30)} cents a share, {'up' if up else 'down'} from "
        f"last year, to be paid to shareholders next month.",
        f"It expects trading to remain {'strong' if up else 'challenging'} for the rest of the year and kept its "
        f"forecasts unchanged.",
    ]
    summary = (
        f"{_possessive(company)} {period} revenue {direction} {change}% to {_money(currency, revenue)} because of {reason}."
    )
    if rng.random() < 0.5:
        summary += f" Pre-tax profit was {_money(currency, profit)}."
    return lead, core, optional, summary


def _sports(rng: random.Random) -> _Story:
    home_town, away_town = rng.sample(_TOWNS, 2)
    home_suffix, away_suffix = rng.sample(("Rovers", "United", "Athletic", "Wanderers", "Harriers", "City", "Town"), 2)
    home, away = f"{home_town} {home_suffix}", f"{away_town} {away_suffix}"
    winner_goals = rng.randint(1, 5)
    loser_goals = rng.randint(0, winner_goals - 1)
    winner, loser = (home, away) if rng.random() < 0.55 else (away, home)
    (scorer, _), (coach, coach_female), (loser_coach, loser_coach_female) = _people(rng, 3)
    minute = rng.randint(55, 90)
    crowd = rng.randrange(3000, 42000, 100)
    competition = rng.choice(("league match", "cup semi-final", "cup quarter-final", "regional championship final"))
    lead = _pick(
        rng,
        f"{winner} beat {loser} {winner_goals}-{loser_goals} in the {competition} on {rng.choice(_WEEKDAYS)}, "
        f"with {scorer} scoring the decisive goal in the {_ordinal(minute)} minute.",
        f"{scorer} scored in the {_ordinal(minute)} minute as {winner} won {winner_goals}-{loser_goals} against "
        f"{loser} in the {competition} on {rng.choice(_WEEKDAYS)}.",
    )
    core = [
        f"{scorer} struck after a long spell of pressure, turning inside a defender and shooting low past the "
        f"goalkeeper from the edge of the area.",
        f"The match was played in front of a crowd of {crowd:,} at {home_town}, where heavy rain had left the "
        f"pitch slow and difficult.",
    ]
    optional = [
        f'{winner} manager {coach} said {"her" if coach_female else "his"} players had "earned every bit of this" '
        f"after a difficult start to the season.",
        f"{loser} manager {loser_coach} said {'her' if loser_coach_female else 'his'} side had created chances but "
        f'"did not take them when it mattered" and would learn from the defeat.',
        f"The result lifts {winner} to {rng.choice(('second', 'third', 'fourth', 'fifth'))} in the table, "
        f"{_number(rng.randint(2, 9))} points behind the leaders.",
        f"{loser} have now gone {_number(rng.randint(2, 7))} matches without a win, and pressure is growing on the "
        f"club's board to invest in new players.",
        f"A second-half penalty appeal by {loser} was turned down by the referee, to the anger of the visiting "
        f"supporters behind the goal.",
        f"The two clubs last met {_number(rng.randint(2, 11))} months ago, when the game ended in a goalless draw.",
        f"{winner} play their next match away from home in {_number(rng.randint(5, 12))} days, and are expected to "
        f"welcome back two injured defenders.",
    ]
    summary = _pick(
        rng,
        f"{winner} beat {loser} {winner_goals}-{loser_goals} in the {competition}, with {scorer} scoring a "
        f"{_ordinal(minute)}-minute winner.",
        f"{_possessive(scorer)} goal gave {winner} a {winner_goals}-{loser_goals} {competition} win over {loser}.",
    )
    return lead, core, optional, summary


def _weather(rng: random.Random) -> _Story:
    storm = f"Storm {rng.choice(_FIRST_NAMES)}"
    region = rng.choice(_REGIONS)
    town = rng.choice(_TOWNS)
    gust = rng.randint(55, 105)
    rain = rng.randint(40, 180)
    homes = rng.randrange(2000, 60000, 500)
    (forecaster, _), (official, _) = _people(rng, 2)
    warnings = rng.randint(4, 40)
    lead = _pick(
        rng,
        f"{storm} brought gusts of up to {gust} mph to {region} on {rng.choice(_WEEKDAYS)}, leaving "
        f"{homes:,} homes without power and blocking roads with fallen trees.",
        f"About {homes:,} homes in {region} lost power after {storm} swept in overnight with winds of up to {gust} mph.",
    )
    core = [
        f"Up to {rain} mm of rain fell in parts of the region in less than a day, and {warnings} flood warnings "
        f"were in place by the afternoon.",
        f"The worst damage was reported in {town}, where trees brought down power lines and several streets were flooded.",
    ]
    optional = [
        f'Forecaster {forecaster} said the storm was "unusually strong for the time of year" and warned that '
        f"rivers could keep rising for another day.",
        f"Engineers were working to reconnect homes, but the power company said some customers may stay without "
        f"electricity for {_number(rng.randint(2, 4))} days.",
        f"Schools in {town} and nearby villages were closed as a precaution, and a number of roads were shut "
        f"because of fallen trees.",
        f"Emergency services said they had answered more than {rng.randrange(150, 1200, 10):,} calls overnight, "
        f"most of them about flooding and damaged roofs.",
        f"{official}, who leads the regional emergency team, urged people to avoid travelling unless necessary "
        f"and to stay away from the coast.",
        "Ferry services along the coast were cancelled and several bridges were closed to high-sided vehicles "
        "until the wind eased.",
        "Calmer weather is expected by the end of the week, although more rain is forecast for areas that are "
        "already flooded.",
    ]
    summary = _pick(
        rng,
        f"{storm} hit {region} with {gust} mph gusts and {rain} mm of rain, leaving {homes:,} homes without power.",
        f"{homes:,} homes lost power as {storm} brought winds of {gust} mph and flooding to {region}.",
    )
    if rng.random() < 0.4:
        summary += f" {town} was worst hit."
    return lead, core, optional, summary


def _science(rng: random.Random) -> _Story:
    institution = rng.choice(
        (
            f"the University of {rng.choice(_TOWNS)}",
            f"the {rng.choice(_TOWNS)} Institute of Technology",
            f"the {rng.choice(_REGIONS).removeprefix('the ')} Marine Laboratory",
        )
    )
    (researcher, researcher_female), (outside, _) = _people(rng, 2)
    percent = rng.randint(12, 70)
    sample = rng.randrange(40, 5000, 10)
    years = rng.randint(2, 12)
    finding, subject, next_step, why = rng.choice(
        (
            (
                f"a common freshwater snail can survive {percent} per cent longer in warm water than previously thought",
                "snails",
                "test whether the effect holds in rivers as well as lakes",
                "Freshwater snails are an important food for fish and birds, so changes in their numbers can affect "
                "whole ecosystems.",
            ),
            (
                f"people who walk for 30 minutes a day sleep {percent} per cent more soundly",
                "volunteers",
                "study whether the benefit lasts into old age",
                "Poor sleep has been linked to a range of health problems, and doctors are looking for simple ways "
                "to improve it without medication.",
            ),
            (
                f"a new coating cuts the heat lost through windows by {percent} per cent",
                "test windows",
                "work with manufacturers on a cheaper version",
                "Windows are one of the main ways heat escapes from homes, particularly in older buildings.",
            ),
            (
                f"bees exposed to city noise visit {percent} per cent fewer flowers",
                "bee colonies",
                "measure the effect on crop yields",
                "Bees pollinate many food crops, and their numbers have been falling in many countries.",
            ),
            (
                f"a soil fungus can break down {percent} per cent of a common plastic within months",
                "soil samples",
                "see whether the process can be scaled up",
                "Most plastic waste takes hundreds of years to break down, and much of it ends up buried or in the sea.",
            ),
            (
                f"seagrass meadows store {percent} per cent more carbon than earlier estimates suggested",
                "seagrass sites",
                "map the meadows along the whole coast",
                "Seagrass has disappeared from large stretches of coastline over the past century because of "
                "pollution and dredging.",
            ),
        )
    )
    journal = rng.choice(
        (
            "Applied Ecology Letters",
            "Open Science Reports",
            "the Review of Environmental Study",
            "Health and Behaviour Quarterly",
        )
    )
    lead = _pick(
        rng,
        f"Researchers at {institution} have found that {finding}, in a study that could change how the problem is understood.",
        f"A study by scientists at {institution} suggests that {finding}, according to results published this week.",
    )
    core = [
        f"The team studied {sample:,} {subject} over {_number(years)} years, comparing them with a control group "
        f"under ordinary conditions.",
        f"The results were published in {journal} after being reviewed by other scientists in the field.",
    ]
    optional = [
        f'Lead author {researcher} said the result "surprised everyone in the lab" and that '
        f"{'she' if researcher_female else 'he'} had expected a much smaller effect.",
        f"The researchers now plan to {next_step}, and hope to report their findings within "
        f"{_number(rng.randint(2, 4))} years.",
        f'{outside}, who was not involved in the study, called the findings "promising but in need of '
        f'confirmation" by other teams.',
        why,
        "Earlier, smaller studies had pointed in the same direction, but they were too small to rule out the "
        "possibility that the results were due to chance.",
        f"The work was funded by a grant of {_money(rng.choice(_CURRENCIES), round(rng.uniform(0.2, 6.0), 1))} "
        f"from a national research council.",
        "The team cautioned that the study showed a link and did not prove cause and effect, and said more work was needed.",
    ]
    summary = _pick(
        rng,
        f"A study of {sample:,} {subject} by {institution} found that {finding}.",
        f"Scientists at {institution} found that {finding}, after studying {sample:,} {subject}.",
    )
    return lead, core, optional, summary


def _court(rng: random.Random) -> _Story:
    (defendant, female), (judge, _), (prosecutor, _), (lawyer, lawyer_female) = _people(rng, 4)
    he, man = ("she", "woman") if female else ("he", "man")
    age = rng.randint(19, 71)
    town = rng.choice(_TOWNS)
    court = f"{rng.choice(_TOWNS)} {rng.choice(('Crown Court', 'District Court', 'Magistrates Court'))}"
    currency = rng.choice(_CURRENCIES)
    amount = rng.randrange(20_000, 2_000_000, 1000)
    charge, act, remark, extra = rng.choice(
        (
            (
                "fraud",
                f"taking {currency}{amount:,} from the charity where {he} worked as treasurer",
                "a serious breach of trust that had deprived people in need of help",
                f"{he.capitalize()} was also banned from acting as a company director or charity trustee for "
                f"{_number(rng.randint(5, 10))} years.",
            ),
            (
                "theft",
                f"stealing building equipment worth {currency}{amount:,} from construction sites",
                "a planned and persistent campaign of theft that had put small firms at risk",
                f"Officers recovered much of the equipment from a rented storage unit on the edge of {town}.",
            ),
            (
                "dangerous driving",
                "causing a crash on the ring road that seriously injured two cyclists",
                "a shocking piece of driving that could easily have killed someone",
                f"{he.capitalize()} was also banned from driving for {_number(rng.randint(3, 9))} years and must pass "
                f"an extended test before getting a licence back.",
            ),
            (
                "false accounting",
                f"hiding losses of {currency}{amount:,} at a building firm",
                "deliberate dishonesty that had misled the firm's lenders and staff",
                f"{he.capitalize()} was also banned from acting as a company director for "
                f"{_number(rng.randint(5, 10))} years.",
            ),
        )
    )
    months = rng.randint(6, 96)
    outcome = f"jailed for {months} months" if rng.random() < 0.7 else f"given a {months}-month suspended sentence"
    lead = _pick(
        rng,
        f"A {age}-year-old {man} from {town} has been {outcome} for {charge} after {act}, a court heard on "
        f"{rng.choice(_WORKDAYS)}.",
        f"{defendant}, {age}, of {town}, was {outcome} at {court} on {rng.choice(_WORKDAYS)} for {act}.",
    )
    core = [
        f"{defendant} had admitted {charge} at an earlier hearing and returned to {court} to be sentenced.",
        f"Prosecutor {prosecutor} told the court the offences took place over {rng.randint(2, 30)} months and "
        f"only came to light by chance.",
    ]
    optional = [
        f"Judge {judge} said the case involved {remark}.",
        f'{lawyer}, defending, said {"her" if lawyer_female else "his"} client was "deeply ashamed" and had '
        f"tried to make amends for what {he} had done.",
        f"The court heard that {defendant} had no previous convictions and had been of good character until the offences.",
        extra,
        "A further hearing to decide how much money can be recovered will be held later this year.",
        "Police said the investigation began after a tip-off from a member of the public who had noticed something was wrong.",
    ]
    summary = _pick(
        rng,
        f"{defendant}, {age}, from {town}, has been {outcome} for {charge} after {act}.",
        f"A {town} {man}, {defendant}, was {outcome} at {court} for {charge}.",
    )
    return lead, core, optional, summary


def _transport(rng: random.Random) -> _Story:
    first, second = rng.sample(_TOWNS, 2)
    operator = f"{rng.choice(_REGIONS).removeprefix('the ')} {rng.choice(('Rail', 'Trains', 'Railways'))}"
    cause = rng.choice(
        (
            "a signal failure",
            "flooding on the tracks",
            "a landslip near the line",
            "a broken-down freight train",
            "damage to overhead power lines",
            "a strike by signal staff",
        )
    )
    passengers = rng.randrange(5000, 90000, 500)
    hours = rng.randint(3, 48)
    (spokesperson, _), (commuter, _) = _people(rng, 2)
    commuter = f"{rng.choice(_FEMALE_NAMES)} {commuter.split()[-1]}"  # quoted with "her journey" below
    lead = _pick(
        rng,
        f"Trains between {first} and {second} were cancelled for {hours} hours on {rng.choice(_WEEKDAYS)} because of "
        f"{cause}, affecting about {passengers:,} passengers.",
        f"About {passengers:,} passengers faced long delays after {cause} shut the line between {first} and {second} "
        f"for {hours} hours.",
    )
    core = [
        f"{operator} said replacement buses were running between the two stations, but journeys were taking up to "
        f"{_number(rng.randint(2, 4))} times longer than usual.",
        "Engineers worked through the night to repair the line, and the first trains ran again shortly after dawn.",
    ]
    optional = [
        f"A spokesperson for {operator}, {spokesperson}, apologised to passengers and said anyone whose journey was "
        f"affected could claim a full refund.",
        f"Commuter {commuter} said it was the {rng.choice(('third', 'fourth', 'fifth'))} time this month her journey "
        f"to work had been disrupted.",
        f"Roads around {first} station were congested for much of the day as people switched to cars and taxis.",
        f"The line carries around {rng.randrange(100, 400, 5)} trains a day and is one of the busiest in the region, "
        f"used by commuters and students.",
        f"{operator} said it would publish a report on the cause within {_number(rng.randint(2, 6))} weeks and "
        f"would review its plans for future disruption.",
        "Local politicians called for more money to be spent on maintaining the ageing line, which they said had "
        "been neglected for years.",
    ]
    summary = _pick(
        rng,
        f"{cause[0].upper()}{cause[1:]} stopped trains between {first} and {second} for {hours} hours, affecting "
        f"{passengers:,} passengers.",
        f"About {passengers:,} passengers were disrupted when the {first} to {second} line closed for {hours} hours "
        f"because of {cause}.",
    )
    return lead, core, optional, summary


def _fire(rng: random.Random) -> _Story:
    town = rng.choice(_TOWNS)
    building = rng.choice(("warehouse", "block of flats", "recycling plant", "hotel", "furniture factory", "school"))
    crews = rng.randint(4, 25)
    firefighters = crews * rng.randint(4, 6)
    evacuated = rng.randrange(20, 600, 5)
    hurt = rng.randint(0, 6)
    (chief, _), (witness, _) = _people(rng, 2)
    witness = f"{rng.choice(_FEMALE_NAMES)} {witness.split()[-1]}"  # quoted with "she heard" below
    if hurt == 0:
        hurt_text = "No one was injured"
    elif hurt == 1:
        hurt_text = "One person was treated in hospital for smoke inhalation"
    else:
        hurt_text = f"{_number(hurt).capitalize()} people were treated in hospital for smoke inhalation"
    lead = _pick(
        rng,
        f"{firefighters} firefighters tackled a large fire at a {building} in {town} on {rng.choice(_WEEKDAYS)}, and "
        f"{evacuated} people were evacuated from nearby homes.",
        f"A fire at a {building} in {town} forced {evacuated} people to leave nearby buildings as {crews} fire crews "
        f"fought the flames for several hours.",
    )
    core = [
        f"{hurt_text}, the fire service said, and the blaze was brought under control by the evening.",
        f"At its height, {crews} crews were at the scene and a column of black smoke could be seen from several miles away.",
    ]
    optional = [
        f'Fire chief {chief} said the crews had done "an outstanding job in very difficult conditions" and '
        f"thanked residents for their patience.",
        f"Witness {witness} said she heard a loud bang before flames appeared through the roof of the {building}.",
        "Residents living nearby were told to keep their windows and doors closed because of the smoke.",
        "The cause of the fire is being investigated, but the fire service said it was not thought to be suspicious.",
        "A rest centre was opened at a nearby community hall for people who could not return to their homes overnight.",
        f"The {building} was built about {rng.randint(15, 90)} years ago and had recently been inspected, "
        f"according to its owners.",
        f"Several roads in {town} remained closed into the evening while crews damped down the site.",
    ]
    summary = _pick(
        rng,
        f"{evacuated} people were evacuated when {crews} fire crews fought a blaze at a {building} in {town}. {hurt_text}.",
        f"A fire at a {building} in {town} led to {evacuated} people being evacuated. {hurt_text}.",
    )
    return lead, core, optional, summary


_TEMPLATES: dict[str, Callable[[random.Random], _Story]] = {
    "council": _council_vote,
    "business": _earnings,
    "sport": _sports,
    "weather": _weather,
    "science": _science,
    "court": _court,
    "transport": _transport,
    "fire": _fire,
}

_MIN_WORDS, _MAX_WORDS = 120, 250
_MIN_SENTENCES, _MAX_SENTENCES = 5, 9


def _word_count(sentences: Iterable[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def _compose(rng: random.Random, story: _Story) -> str:
    """Lead + core + a random, order-preserving subset of the optional sentences, within the length limits."""
    lead, core, optional, _ = story
    fixed = [lead, *core]
    n_optional = rng.randint(max(0, _MIN_SENTENCES - len(fixed)), min(len(optional), _MAX_SENTENCES - len(fixed)))
    keep = sorted(rng.sample(range(len(optional)), n_optional))
    rest = [i for i in range(len(optional)) if i not in keep]
    rng.shuffle(rest)

    def words() -> int:
        return _word_count(fixed + [optional[i] for i in keep])

    # Grow until long enough, then shrink if too long (never below the sentence minimum)
    while words() < _MIN_WORDS and rest and len(fixed) + len(keep) < _MAX_SENTENCES:
        keep = sorted([*keep, rest.pop()])
    while words() > _MAX_WORDS and len(fixed) + len(keep) > _MIN_SENTENCES:
        keep.pop(rng.randrange(len(keep)))
    return " ".join(fixed + [optional[i] for i in keep])


def generate_news_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """
    Generate synthetic news articles with reference summaries.

    Stories come from eight templates (council vote, company results, sports result, storm, scientific study,
    court case, rail disruption, fire), filled with invented names, places and numbers. An article is 5-9
    sentences (a lead sentence with the key facts, then details, quotes and background) of about 120-250 words;
    its summary is 1-2 sentences restating the key facts. Example ``i`` depends only on ``(seed, i)``, so a
    longer list extends a shorter one with the same seed.

    :param n: Number of examples.
    :param seed: Random seed; the same seed always gives the same examples.
    :return: List of dicts with keys ``"id"``, ``"topic"``, ``"article"`` and ``"summary"``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    topics = list(_TEMPLATES)
    # Cycle through the topics in a seeded order so that even a small batch is varied
    random.Random(f"sb3_textrl.news.order.{seed}").shuffle(topics)
    examples = []
    for i in range(n):
        rng = random.Random(f"sb3_textrl.news.{seed}.{i}")
        topic = topics[i % len(topics)]
        story = _TEMPLATES[topic](rng)
        examples.append({"id": f"synthetic-{seed}-{i}", "topic": topic, "article": _compose(rng, story), "summary": story[3]})
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Loading real corpora
# ----------------------------------------------------------------------------------------------------------------

# Auto-detected field names, tried in this order
ARTICLE_FIELDS = ("article", "document", "text", "source")
SUMMARY_FIELDS = ("summary", "highlights", "reference", "target")

_FILE_SUFFIXES = (".jsonl", ".json", ".csv")

# Hub datasets with known layouts: short name -> (hub id, config, article field, summary field)
_HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary"),
}

# A hub id: "name" or "owner/name", without a file extension
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _is_hub_name(source: str) -> bool:
    suffix = Path(source).suffix
    looks_like_file = bool(suffix) and suffix[1:].isalpha()  # "v1.0" is a version, ".csv" a file
    return _HUB_NAME.fullmatch(source) is not None and not looks_like_file


def _pick_field(fields: Iterable[str], explicit: str | None, candidates: tuple[str, ...], kwarg: str, where: str) -> str:
    fields = list(fields)
    if explicit is not None:
        if explicit not in fields:
            raise ValueError(
                f"{where}: field {explicit!r} (from {kwarg}=) not found; the data has fields {fields}. "
                f"Pass {kwarg}= one of those."
            )
        return explicit
    for name in candidates:
        if name in fields:
            return name
    raise ValueError(
        f"{where}: none of the expected fields {list(candidates)} found; the data has fields {fields}. "
        f"Pass {kwarg}=<field name> to say which one to use."
    )


def _make_rows(
    records: Iterable[tuple[str, Any]],
    where: str,
    article_field: str | None,
    summary_field: str | None,
    limit: int | None,
) -> list[dict[str, str]]:
    """
    Turn ``(location, record)`` pairs into ``{"article", "summary"}`` rows.

    Field names are detected on the first record and then required of every record.
    """
    rows: list[dict[str, str]] = []
    fields: tuple[str, str] | None = None
    for location, record in records:
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}, {location}: expected an object with article and summary fields, got {type(record).__name__}."
            )
        if fields is None:
            fields = (
                _pick_field(record, article_field, ARTICLE_FIELDS, "article_field", f"{where}, {location}"),
                _pick_field(record, summary_field, SUMMARY_FIELDS, "summary_field", f"{where}, {location}"),
            )
        row = {}
        for key, field, kwarg in (("article", fields[0], "article_field"), ("summary", fields[1], "summary_field")):
            if field not in record:
                raise ValueError(
                    f"{where}, {location}: missing field {field!r} (used as the {key}, found on earlier rows); this row "
                    f"has fields {list(record)}. Fix the row, or pass {kwarg}= to choose another field."
                )
            value = record[field]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = "\n".join(value)  # e.g. highlights stored as a list of sentences
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}, {location}: field {field!r} (the {key}) must be non-empty text, got {value!r}. "
                    f"Fix or remove the row."
                )
            row[key] = value.strip()
        rows.append(row)
    if not rows:
        raise ValueError(f"{where}: the dataset is empty; it needs at least one row with an article and a summary.")
    return rows


def _jsonl_records(path: Path) -> Iterable[tuple[str, Any]]:
    for line_number, line in enumerate(jsonl_lines(read_text_file(path, "the dataset")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}, line {line_number}: invalid JSON ({e.msg} at column {e.colno}). A .jsonl file needs one "
                f"complete JSON object per line; fix or remove that line."
            ) from e
        yield f"line {line_number}", record


def _json_records(path: Path, split: str) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(read_text_file(path, "the dataset"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}). If the file holds one object per "
            f"line, rename it to .jsonl."
        ) from e
    if isinstance(data, dict):
        # {"train": [...], "test": [...]}, or a single list under a key such as "data"
        lists = {key: value for key, value in data.items() if isinstance(value, list)}
        if split in lists:
            data = lists[split]
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        else:
            raise ValueError(
                f"{path}: expected a list of objects, or an object holding one list (or one list per split); found "
                f"keys {list(data)}. Pass split= one of {list(lists)}, or store a plain list of rows."
            )
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of objects with article and summary fields, got {type(data).__name__}.")
    return ((f"item {i}", record) for i, record in enumerate(data))


def _csv_records(path: Path) -> Iterable[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text_file(path, "the dataset"), newline=""))
    for record in reader:
        # line_num is the physical line where the record ends (quoted fields may span lines)
        yield f"line {reader.line_num}", record


def _load_hub(
    name: str, split: str, article_field: str | None, summary_field: str | None, limit: int | None
) -> list[dict[str, str]]:
    try:
        import datasets  # optional dependency, only for hub names
    except ImportError as e:
        raise ImportError(
            f"{name!r} is not a local file, so it would be loaded from the Hugging Face hub, which needs the `datasets` "
            f"library: pip install datasets (and the hub must be reachable from this machine). Otherwise pass the path "
            f"of a local .jsonl, .json or .csv file with article and summary fields."
        ) from e
    hub_id, config, known_article, known_summary = _HUB_DATASETS.get(name.split("/")[-1].lower(), (name, None, None, None))
    try:
        dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        raise RuntimeError(
            f"Could not load {hub_id!r} (config {config!r}, split {split!r}) with `datasets`: {e}. Check that the hub is "
            f"reachable and the split exists, or pass a local .jsonl/.json/.csv file instead."
        ) from e
    if limit is not None and hasattr(dataset, "select"):
        dataset = dataset.select(range(min(limit, len(dataset))))
    return _make_rows(
        ((f"row {i}", record) for i, record in enumerate(dataset)),
        f"{hub_id} ({split})",
        article_field or known_article,
        summary_field or known_summary,
        limit,
    )


def load_summary_dataset(
    source: str | os.PathLike,
    split: str = "test",
    article_field: str | None = None,
    summary_field: str | None = None,
    limit: int | None = None,
) -> list[dict[str, str]]:
    """
    Load (article, summary) pairs from a local file or the Hugging Face hub.

    A local ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or an object mapping split names
    to lists) or ``.csv`` (with a header row) file is read directly. A name that is not a path, such as
    ``"cnn_dailymail"``, ``"xsum"`` or ``"EdinburghNLP/xsum"``, is loaded with ``datasets.load_dataset`` (optional
    dependency; the hub must be reachable), using the known fields and config of CNN/DailyMail (``article`` /
    ``highlights``, config ``"3.0.0"``) and XSum (``document`` / ``summary``).

    Unless given, field names are detected on the first row, taking the first present of
    ``article``, ``document``, ``text``, ``source`` for the article and
    ``summary``, ``highlights``, ``reference``, ``target`` for the summary.

    :param source: Path of a ``.jsonl``/``.json``/``.csv`` file, or a dataset name on the hub.
    :param split: Split to load from the hub, or from a ``.json`` file holding one list per split; ignored for
        ``.jsonl`` and ``.csv`` files.
    :param article_field: Name of the field holding the article (default: auto-detect).
    :param summary_field: Name of the field holding the reference summary (default: auto-detect).
    :param limit: Keep at most this many rows (the first ones).
    :return: List of dicts with keys ``"article"`` and ``"summary"`` (whitespace-stripped strings).
    :raises FileNotFoundError: If a path does not exist.
    :raises ValueError: For an unsupported extension, invalid JSON, rows lacking the fields, or an empty dataset.
    :raises ImportError: If a hub name is given and ``datasets`` is not installed.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}.")
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and _is_hub_name(source):
            return _load_hub(source, split, article_field, summary_field, limit)
        raise FileNotFoundError(
            f"Dataset file {str(source)!r} does not exist (resolved to {path.resolve()}). Pass the path of a "
            f".jsonl, .json or .csv file, or a hub dataset name such as 'cnn_dailymail' or 'xsum'."
        )
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the path of a .jsonl, .json or .csv file inside it.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".json":
        records = _json_records(path, split)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise ValueError(
            f"{path}: unsupported file extension {suffix or '(none)'!r}; supported are {', '.join(_FILE_SUFFIXES)}. "
            f'Convert the file, e.g. to JSON Lines with one {{"article": ..., "summary": ...}} object per line.'
        )
    return _make_rows(records, str(path), article_field, summary_field, limit)
